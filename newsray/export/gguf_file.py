"""Write a Llama-architecture Hugging Face model (merged, in memory) as a GGUF file llama.cpp loads.

What llama.cpp's own converter (convert_hf_to_gguf.py, its LlamaModel) does, done here with the
`gguf` package's GGUFWriter on the tensors we already hold:
- hyperparameters under `llama.*` (block count, context, widths, heads, RoPE base and dimension,
  RMS-norm epsilon, vocab size) and `general.*` (name, file type, quantisation version);
- q_proj / k_proj rows permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved one
  (`_permute`: reshape (heads, 2, head_dim/2, ...), swap the middle axes; k uses the KV heads);
- tensor names mapped with gguf.TensorNameMap; 1-D tensors and norms in F32, every other weight
  in the chosen type (F32/F16/BF16/Q8_0; Q8_0 is quantised by gguf.quants in pure Python); the
  output head omitted when the embeddings are tied (llama.cpp then reuses token_embd);
- the tokenizer as a GPT-2 BPE vocab (tokens, token types, merges, pre-tokenizer name), the
  special token ids, add_bos/add_eos and the chat template (gguf.SpecialVocab reads them from
  the saved tokenizer files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from newsray.errors import ModelError

QUANTS = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}

# tokenizer.ggml.pre tells llama.cpp which pre-tokenizer regex to run. Its converter recognises a
# tokenizer by hashing the ids of a probe text; here we recognise the families newsray supports by
# their special tokens (and check the result against llama.cpp's own GGUF of SmolLM2 in the tests).
_PRE_TOKENIZERS = (
    ("<|im_start|>", 49152, "smollm"),  # SmolLM / SmolLM2 (all sizes share the 49,152-token vocab)
    ("<|begin_of_text|>", None, "llama-bpe"),  # Llama-3.x
)


def _permute(w: Any, n_head: int) -> Any:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (llama.cpp LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a ModelError for an unknown family."""
    vocab = tokenizer.get_vocab()
    for marker, size, name in _PRE_TOKENIZERS:
        if marker in vocab and (size is None or len(vocab) == size):
            return name
    raise ModelError("GGUF export knows the SmolLM2 and Llama-3 BPE tokenizers only (llama.cpp must be told which "
                     "pre-tokenizer to run); export --format merged and convert that directory with llama.cpp's "
                     "convert_hf_to_gguf.py.")


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types in id order, as llama.cpp's converter lists a BPE vocab."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            special = decoder[i].special if i in decoder else False
            looks_special = tok.startswith("<|") and tok.endswith("|>")
            types.append(gguf.TokenType.CONTROL if special or looks_special else gguf.TokenType.USER_DEFINED)
            tokens.append(tok)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _tensor_type(name: str, ndim: int, quant: str) -> str:
    """GGML type of one tensor: 1-D tensors and norms stay F32 (as llama.cpp's converter keeps them)."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    return QUANTS[quant]


def write_gguf(model: Any, tokenizer: Any, tokenizer_dir: Path, path: Path, quant: str, name: str) -> dict[str, int]:
    """Write `model` (a LlamaForCausalLM, any float dtype) + its saved tokenizer files as GGUF at `path`.

    Returns how many tensors went to each GGML type.
    """
    import gguf
    import numpy as np
    import torch

    if quant not in QUANTS:
        raise ModelError(f"unknown GGUF type {quant!r}: use one of {', '.join(QUANTS)}.")
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ModelError(f"GGUF export writes Llama-architecture models (SmolLM2, Llama-3.x); this one is "
                         f"{getattr(cfg, 'model_type', 'unknown')!r}: export --format merged instead.")
    pre = pre_tokenizer(tokenizer)  # fail before writing anything
    arch = gguf.MODEL_ARCH.LLAMA
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ModelError(f"GGUF export does not write RoPE scaling {rope.get('rope_type')!r} yet; export --format merged "
                         "and convert it with llama.cpp's convert_hf_to_gguf.py.")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocab(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ModelError(f"the tokenizer in {tokenizer_dir} has no BPE merges (tokenizer.json); GGUF export needs a BPE tokenizer.")
    if "bos" not in special.add_special_token:  # say it, as llama.cpp's converter does for SmolLM2: its default differs
        probe = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_to_gguf(w, quiet=True)

    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        new_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(f"GGUF export cannot map the tensor {hf_name!r} to a llama.cpp name; export --format merged instead.")
        data = tensor.detach().to(torch.float32)
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        arr = data.contiguous().numpy()
        qtype = getattr(gguf.GGMLQuantizationType, _tensor_type(new_name, arr.ndim, quant))
        packed = gguf.quants.quantize(arr, qtype) if qtype != gguf.GGMLQuantizationType.F32 else arr.astype(np.float32)
        w.add_tensor(new_name, packed, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return counts


def read_metadata(path: Path) -> dict[str, Any]:
    """The scalar/string metadata of a GGUF file (arrays summarised by length), for checks and docs."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if len(field.data) > 1 or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            out[key] = f"[{len(field.data)} items]"
        else:
            try:
                out[key] = field.contents()
            except Exception:  # noqa: BLE001, S112 - an exotic field type: leave it out of the summary
                continue
    return out
