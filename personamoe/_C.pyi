# Type stub of the compiled CPU extension (csrc/bindings.cpp). Addresses are tensor.data_ptr()
# values; 0 stands for "none" in optional inputs.

def route_tokens(
    h: int,
    T: int,
    E: int,
    r: int,
    calibration: int,
    persona_bias: int,
    persona_ids: int,
    P: int,
    k: int,
    temperature: float,
    normalize: int,
    topk_idx: int,
    topk_gates: int,
    scores: int,
    num_threads: int,
) -> None: ...
def has_openmp() -> bool: ...
