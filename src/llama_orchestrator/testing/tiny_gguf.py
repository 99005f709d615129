"""Write a tiny, random-weight llama-architecture GGUF model for tests and demos.

The model is a few hundred KB (n_embd 64, 2 layers, 4 heads, n_ff 128, context 512, f32 weights) with a
SentencePiece-style ("llama") vocabulary made of ``<unk>``, ``<s>``, ``</s>`` and the 256 byte tokens
``<0x00>``..``<0xFF>``, so any text tokenizes through byte fallback. The real llama.cpp ``llama-server`` loads it in
well under a second and answers completions with garbage text.

Usage::

    python -m llama_orchestrator.testing.tiny_gguf OUT.gguf [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from pathlib import Path

__all__ = ["CHATML_TEMPLATE", "TINY_MODEL_PARAMS", "main", "write_tiny_model"]

#: Hyper-parameters of the generated model.
TINY_MODEL_PARAMS: dict[str, int | float] = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_head_kv": 4,
    "n_ff": 128,
    "n_ctx": 512,
    "rms_eps": 1e-5,
    "rope_freq_base": 10000.0,
}

#: A plain ChatML template; llama.cpp renders it with its Jinja engine (or recognises it as "chatml").
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_UNK_ID, _BOS_ID, _EOS_ID = 0, 1, 2


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the byte-level SPM vocabulary."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    types += [int(gguf.TokenType.BYTE)] * 256
    return tokens, scores, types


def write_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` atomically and deterministically; return the resolved path.

    The same ``seed`` always gives byte-identical files. The file is written to a temporary file in the same folder
    and moved into place with ``os.replace``, so readers never see a partial model.
    """
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = TINY_MODEL_PARAMS
    n_embd, n_layer, n_head = int(p["n_embd"]), int(p["n_layer"]), int(p["n_head"])
    n_head_kv, n_ff, n_ctx = int(p["n_head_kv"]), int(p["n_ff"]), int(p["n_ctx"])
    head_dim = n_embd // n_head
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        # numpy shape is (rows, cols) = ggml ne reversed: (n_out, n_in)
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones((n,), dtype=np.float32)

    # Like mkstemp, but with the umask-respecting mode of an ordinary file (mkstemp gives 0600).
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        break
    try:
        writer = gguf.GGUFWriter(None, "llama")
        writer.add_name("tiny-llama-test")
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_vocab_size(n_vocab)
        writer.add_context_length(n_ctx)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(p["rope_freq_base"]))
        writer.add_layer_norm_rms_eps(float(p["rms_eps"]))

        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(_UNK_ID)
        writer.add_bos_token_id(_BOS_ID)
        writer.add_eos_token_id(_EOS_ID)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
        for i in range(n_layer):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(n_embd))
            writer.add_tensor(f"blk.{i}.attn_q.weight", weight(n_head * head_dim, n_embd))
            writer.add_tensor(f"blk.{i}.attn_k.weight", weight(n_head_kv * head_dim, n_embd))
            writer.add_tensor(f"blk.{i}.attn_v.weight", weight(n_head_kv * head_dim, n_embd))
            writer.add_tensor(f"blk.{i}.attn_output.weight", weight(n_embd, n_head * head_dim))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(n_embd))
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
        writer.add_tensor("output_norm.weight", ones(n_embd))
        writer.add_tensor("output.weight", weight(n_vocab, n_embd))

        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_orchestrator.testing.tiny_gguf",
        description="Write a tiny random llama GGUF model (a few hundred KB) for tests. "
        "Example: python -m llama_orchestrator.testing.tiny_gguf models/tiny.gguf",
    )
    parser.add_argument("out", type=Path, help="output .gguf path (parent folders are created)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    args = parser.parse_args(argv)
    print(write_tiny_model(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
