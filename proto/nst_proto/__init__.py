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
* :func:`enum_value_names`: how the client's options and the server's settings spell an API enum's values.
"""

import os

#: Deadlines longer than this are no deadline, s (about 31.7 years). gRPC keeps a call's deadline as int64
#: nanoseconds of the wall clock, so one more than about 7.4e9 s away (2^63 ns less the time since 1970)
#: overflows and the call fails at once with DEADLINE_EXCEEDED, never reaching the server.
MAX_TIMEOUT_S = 1e9


def enum_value_names(enum) -> dict[int, str]:
    """An ``nst.v1`` enum's values as options and settings spell them: number -> the value's name without the
    values' common prefix, lower-cased (``COLOR_CONTROL_MATCH_STYLE_COLORS`` -> ``"match_style_colors"``); the 0
    value (``…_UNSPECIFIED``: the server's default) left out.

    Args:
        enum: a protobuf ``EnumDescriptor``, e.g. ``StylizeRequest.DESCRIPTOR.fields_by_name["optimizer"].enum_type``.
    """
    common = os.path.commonprefix([value.name for value in enum.values])
    prefix = common[:common.rindex("_") + 1]
    return {value.number: value.name[len(prefix):].lower() for value in enum.values if value.number != 0}
