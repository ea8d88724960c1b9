// The chunked-body decoder (BodyPump with chunked input). The first byte picks the output framing
// and how the input is cut into reads; the rest arrives read by read, as from a socket.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include <event2/buffer.h>

#include "core/http1.h"

using namespace stepflow::http1;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    bool chunked_out = data[0] & 1;
    size_t step = (data[0] >> 1) + 1;  // 1..128 bytes per read
    ++data;
    --size;
    evbuffer* in = evbuffer_new();
    evbuffer* out = evbuffer_new();
    BodyPump pump;
    pump.start(Framing::Chunked, 0, chunked_out);
    BodyPump::Status status = BodyPump::Status::More;
    for (size_t at = 0; at < size && status == BodyPump::Status::More; at += step) {
        size_t n = size - at < step ? size - at : step;
        evbuffer_add(in, data + at, n);
        status = pump.pump(in, out);
    }
    // Whatever was decoded, the payload count matches what was re-emitted when it is raw.
    if (status == BodyPump::Status::Done && !chunked_out && pump.payload_bytes() != evbuffer_get_length(out))
        std::abort();
    evbuffer_free(in);
    evbuffer_free(out);
    return 0;
}
