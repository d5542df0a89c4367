"""The tools that run beside the service, not in it: ``nst-demo`` (:mod:`nst_tools.demo`: the main job end to
end, with the paintings of ``samples/``; also :func:`~nst_tools.demo.start_server`, an ``nst-server`` child
process for the tests and the benchmarks), ``nst-quality`` (:mod:`nst_tools.quality`: the picture judge) and
``nst-gpu-check`` (:mod:`nst_tools.gpu_check`: the GPU run in one command).

They drive the server's engine and start ``nst-server``, so they need the server extra. :mod:`nst_server` is
imported first: it names that extra when it is missing, and sets its kernel-cache environment before anything
here imports torch.
"""

import nst_server  # noqa: F401  (first: the server extra's check and the environment torch reads when it loads)
