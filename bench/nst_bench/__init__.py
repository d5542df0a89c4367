"""``nst-benchmark``: the engine and the server against a plain PyTorch tutorial loop (:mod:`nst_bench.cli`).

Modules: :mod:`~nst_bench.tutorial` (the tutorial's VGG and loop, the baseline), :mod:`~nst_bench.measure`
(FLOPs, traces of the engine and the server, levers, batching, peak memory), :mod:`~nst_bench.report` (the
figures and ``benchmark.json``), :mod:`~nst_bench.inputs` (the model file and the images), :mod:`~nst_bench.cli`
(the options and the run), :mod:`~nst_bench.sizes` (``nst-benchmark sizes``: time per megapixel-iteration and
peak memory against the output's size, each size in a fresh process).
"""

# nst_server sets oneDNN's kernel cache sizes in the environment before anything imports torch (its __init__):
# import it first, so that the benchmark measures the server's configuration.
import nst_server as _nst_server  # noqa: F401
