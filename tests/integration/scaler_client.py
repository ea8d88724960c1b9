"""A real gRPC client of the balancer's KEDA external scaler (run with Debian's /usr/bin/python3,
which has python3-grpcio and python3-grpc-tools). Stubs are generated from the project's
proxy/externalscaler.proto into a temporary directory at each run.

  scaler_client.py ADDR stream            StreamIsActive: one line per message, "active true|false"
  scaler_client.py ADDR isactive          IsActive: prints {"result": bool}
  scaler_client.py ADDR spec [TARGET]     GetMetricSpec: prints the specs as JSON
  scaler_client.py ADDR metrics NAME      GetMetrics: prints the values as JSON
  scaler_client.py ADDR unknown           calls StreamMetricSpec, prints the status code name
"""

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "proxy")


def stubs():
    from grpc_tools import protoc
    out = tempfile.mkdtemp(prefix="scaler-stubs-")
    rc = protoc.main(["protoc", "-I" + PROTO_DIR, "--python_out=" + out, "--grpc_python_out=" + out,
                      os.path.join(PROTO_DIR, "externalscaler.proto")])
    if rc != 0:
        raise SystemExit("protoc failed: %d" % rc)
    sys.path.insert(0, out)
    import externalscaler_pb2
    import externalscaler_pb2_grpc
    return externalscaler_pb2, externalscaler_pb2_grpc


def main():
    import grpc
    addr, command = sys.argv[1], sys.argv[2]
    pb, pb_grpc = stubs()
    channel = grpc.insecure_channel(addr)
    stub = pb_grpc.ExternalScalerStub(channel)
    ref = pb.ScaledObjectRef(name="workers", namespace="ns")
    if command == "stream":
        print("open", flush=True)
        for message in stub.StreamIsActive(ref):
            print("active", "true" if message.result else "false", flush=True)
    elif command == "isactive":
        print(json.dumps({"result": stub.IsActive(ref, timeout=10).result}))
    elif command == "spec":
        if len(sys.argv) > 3:
            ref.scalerMetadata["targetDemand"] = sys.argv[3]
        r = stub.GetMetricSpec(ref, timeout=10)
        print(json.dumps([{"metricName": s.metricName, "targetSize": s.targetSize} for s in r.metricSpecs]))
    elif command == "metrics":
        r = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName=sys.argv[3]), timeout=10)
        print(json.dumps([{"metricName": v.metricName, "metricValue": v.metricValue,
                           "metricValueFloat": v.metricValueFloat} for v in r.metricValues]))
    elif command == "unknown":
        call = channel.unary_unary("/externalscaler.ExternalScaler/StreamMetricSpec",
                                   request_serializer=pb.ScaledObjectRef.SerializeToString,
                                   response_deserializer=pb.GetMetricSpecResponse.FromString)
        try:
            call(ref, timeout=10)
            print("OK")
        except grpc.RpcError as e:
            print(e.code().name)


if __name__ == "__main__":
    main()
