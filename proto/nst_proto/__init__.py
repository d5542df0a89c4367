"""The floor every component of nst-inference shares: the ``nst.v1`` API's generated stubs and the small helpers
every console script uses. The client, the server, the export, the benchmark and the tools import from here;
this package imports none of them, and nothing here needs torch, numpy or onnxruntime (the bare install, the
client alone, carries it).

* :mod:`nst_proto.v1`: ``style_transfer_pb2`` (messages) and ``style_transfer_pb2_grpc`` (stub and servicer),
  generated from ``proto/nst/v1/style_transfer.proto`` by ``python proto/generate.py``.
* :mod:`nst_proto.files`: files written whole or not at all (atomic writes).
* :mod:`nst_proto.console`: console streams that a closed or full terminal, pipe or file cannot stop.
* :mod:`nst_proto.argtypes`: argparse types of numeric flags.
* :mod:`nst_proto.extras`: the pip extras, named when a package needs one that is missing.
"""

#: Deadlines longer than this are no deadline, s (about 31.7 years). gRPC keeps a call's deadline as int64
#: nanoseconds of the wall clock, so one more than about 7.4e9 s away (2^63 ns less the time since 1970)
#: overflows and the call fails at once with DEADLINE_EXCEEDED, never reaching the server.
MAX_TIMEOUT_S = 1e9
