"""Running one model across several processes or machines with `mx.distributed` (launched by `mlx.launch`).

`mlx_gemma.load(path, group=mx.distributed.init(), strategy="pipeline")` gives each rank its share:
pipeline.py runs a contiguous range of layers per rank, sharded_loading.py reads only that share
from disk (or the hub), watchdog.py ends a rank whose peers fall silent.  `strategy="tensor"` is
tensor_parallel.py's (heads and MLP widths split across ranks, experts for MoE).
"""

from .pipeline import PipelineModel
from .sharded_loading import load_pipeline, pipeline_bytes
from .tensor_loading import load_tensor_parallel
from .watchdog import watch

__all__ = ["PipelineModel", "load_pipeline", "load_tensor_parallel", "pipeline_bytes", "watch"]
