"""Per-request personas in vLLM: not supported by this plugin, and why.

A persona (``personamoe.Persona``: allowed experts, score biases or a fixed mixture) is chosen per
request. Inside a layer the op needs it per *token* (``persona_ids [T]`` indexing a ``[P, E]``
table), so the layer must know, at every forward, which request each row of the flattened batch
belongs to. vLLM 0.32 gives a layer no such thing through a public interface:

- ``SamplingParams.extra_args`` carries per-request data into the engine, but it reaches the
  sampler and logits processors only, never the model's forward;
- the forward context (``vllm.forward_context.get_forward_context()``) holds the attention
  metadata (per-request query start offsets) but not the request ids or their parameters, and its
  layout differs per attention backend;
- vLLM's LoRA machinery does carry a per-token index (the Punica wrapper's token -> LoRA slot
  mapping), but it belongs to LoRA requests; reusing it to smuggle persona ids would make a LoRA
  request mean a persona, which is the "faking it" this plugin will not do.

So every request of a served checkpoint routes freely over the whole bank (token routing, the
options of the checkpoint's ``personamoe`` section). A fixed per-deployment mixture is available
by exporting with ``personamoe.merge`` applied (no plugin needed at all), or by serving several
exports.

The path to real per-request personas: a small upstream hook in vLLM's GPU/CPU model runner that
copies a per-request tensor from ``SamplingParams.extra_args`` (e.g. ``{"persona": "calm"}``
resolved to a row id) into a persistent ``[max_num_batched_tokens]`` buffer alongside the
positions, exposed through the forward context; the persona layers would then pass that buffer as
``persona_ids`` (the op already accepts per-token ids, and invalid ids mean "no persona", so a
stale buffer can never read out of bounds). That is the same shape as the LoRA token mapping, so
it stays CUDA-graph safe.
"""

SUPPORTED = False
