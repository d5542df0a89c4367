"""The ``nst.v1`` API's generated stubs: ``style_transfer_pb2`` (messages) and ``style_transfer_pb2_grpc`` (stub and
servicer), made from ``proto/nst/v1/style_transfer.proto`` by ``python proto/generate.py``."""
