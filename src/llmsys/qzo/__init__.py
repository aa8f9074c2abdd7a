"""QZO: zeroth-order fine-tuning of quantised models (perturb and update only the quantisation scales).

- `QZO` - the optimizer (``torch.optim`` style, ``step(closure)``), registered as method ``"qzo"``;
  `MeZO` - the full-precision zeroth-order baseline (method ``"mezo"``).
- `Int4Linear`, `quantize_int4`, `load_gptq` - llmsys's group-wise int4 layers (scales read live by
  the `llmsys.kernels.int4_matmul` kernel) and GPTQ checkpoint loading; `quantize_bnb`,
  `bnb_scales` - the bitsandbytes NF4/FP4 backend (``quant_state.absmax``).
- `train` - the shared loop (progress, eval, scale-only checkpoints, exact resume, data parallel);
  `first_order`, `lora` - the first-order baselines.

See docs/qzo.md.
"""

from llmsys.qzo.baselines import first_order, lora
from llmsys.qzo.bnb import bnb_available, bnb_scales, is_bnb_4bit, quantize_bnb
from llmsys.qzo.errors import (
    BitsAndBytesUnavailableError,
    CheckpointError,
    DoubleQuantizationError,
    NoTrainableTensorsError,
    QuantizationError,
    QZOError,
)
from llmsys.qzo.int4 import Int4Linear, load_gptq, quantizable_linears, quantize_int4
from llmsys.qzo.optimizer import QZO, MeZO, StepInfo, ZerothOrderOptimizer, quantized_scales
from llmsys.qzo.train import (
    TrainResult,
    causal_lm_loss,
    chunked_causal_lm_loss,
    load_checkpoint,
    save_checkpoint,
    train,
)
from llmsys.registry import register_method

register_method("qzo", plugin="qzo")(QZO)
register_method("mezo", plugin="qzo")(MeZO)

__all__ = [
    "BitsAndBytesUnavailableError",
    "CheckpointError",
    "DoubleQuantizationError",
    "Int4Linear",
    "MeZO",
    "NoTrainableTensorsError",
    "QZO",
    "QZOError",
    "QuantizationError",
    "StepInfo",
    "TrainResult",
    "ZerothOrderOptimizer",
    "bnb_available",
    "bnb_scales",
    "causal_lm_loss",
    "chunked_causal_lm_loss",
    "first_order",
    "is_bnb_4bit",
    "load_checkpoint",
    "load_gptq",
    "lora",
    "quantizable_linears",
    "quantize_bnb",
    "quantize_int4",
    "quantized_scales",
    "save_checkpoint",
    "train",
]
