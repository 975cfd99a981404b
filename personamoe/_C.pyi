# Type stub of the compiled CPU extension (csrc/bindings.cpp). Addresses are tensor.data_ptr()
# values; 0 stands for "none" in optional inputs. The enums are those of csrc/common/codes.h, their
# members named as Python spells them (personamoe/backends/kernel_codes.py).

import enum

class DType(enum.Enum):
    float32 = 0
    bfloat16 = 1
    float16 = 2
    float64 = 3
    int32 = 4
    int64 = 5

class Normalize(enum.Enum):
    topk = 0
    full = 1

class Mode(enum.Enum):
    token = 0
    fixed = 1

class LayerArgs:
    """One call of the fused layer (csrc/layer.h); LayerArgs(**fields) sets any subset."""

    T: int
    d_in: int
    d_out: int
    E: int
    r: int
    k: int
    dtype: DType
    x: int
    x_stride: int
    lora_a: int
    lora_b: int
    scaling: int
    calibration: int
    table: int
    P: int
    persona_ids: int
    ids_dtype: DType
    mode: Mode
    temperature: float
    normalize: Normalize
    weight: int
    bias: int
    y: int
    y_stride: int
    h: int
    h_stride: int
    topk_idx: int
    topk_gates: int
    scores: int
    num_threads: int
    def __init__(self, **fields: object) -> None: ...

def layer_forward(args: LayerArgs | None = None, /, **fields: object) -> None:
    """layer_forward(args) or layer_forward(**fields of LayerArgs); GIL released in the kernel."""

def shrink_only(
    dtype: int,
    x: int,
    x_stride: int,
    w: int,
    T: int,
    d_in: int,
    rows: int,
    h: int,
    num_threads: int,
) -> None: ...
def force_isa(name: str) -> str | None: ...
def active_isa() -> str: ...
