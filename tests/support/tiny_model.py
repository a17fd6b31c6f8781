# The chat template at the end of this file is verbatim, long lines included.
# ruff: noqa: E501
"""A tiny, hand-wired GGUF model that a real llama-server can run in tests.

The model is a 2-layer llama with random weights plus a few hand-set circuits:

* One residual dimension holds a constant that no block writes to; the output head uses
  it to give every non-printable byte, every byte >= 0x80 and every special token a large
  negative logit. Plain chat is therefore printable ASCII and never ends before
  ``max_tokens``.
* When the prompt contains the ``<tools>`` token (which the Qwen2.5 chat template writes
  whenever tools are offered) an attention head raises a "tools offered" flag. FFN
  neurons combine that flag with the last token to steer the model through a Hermes
  tool call: ``<tool_call>`` after a newline, ``\\n`` after ``<tool_call>``, a filler word
  inside quotes, closing brackets early, ``</tool_call>`` after ``}`` and EOS after
  ``</tool_call>``. llama-server's tool-call grammar does the rest, so every request with
  tools returns a valid tool call.

Behaviours (``--behaviour``), for clients that always offer tools (the Codex CLI):

* ``tools`` (the default): the above.
* ``text``: with tools offered it answers ``the`` and stops (no tool call).
* ``tool-once``: ``<tool_response>`` is a token too and a second detector head raises a
  "responded" flag when the prompt holds a tool result: without one the model calls a tool as
  above; with one it answers ``the`` and stops. An agent loop therefore ends after one call.

Usage: ``python -m tests.support.tiny_model OUT.gguf [--seed N] [--behaviour B]``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]

# Hyperparameters from the reference description (tests rely on the shape, not the values).
N_EMBD = 128
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 256
N_CTX = 4096
# A high RoPE base keeps the slowest-rotating pair nearly still over 4096 positions, so the
# tools-detector head attends by content alone.
ROPE_FREQ_BASE = 1_000_000.0
RMS_EPS = 1e-6
N_MERGES = 320

SPECIAL_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SPECIAL_USER = ("<tool_call>", "</tool_call>", "<tools>")
SPECIAL_RESPONSE = ("<tool_response>", "</tool_response>")  # tool-once only
BEHAVIOURS = ("tools", "text", "tool-once")
EOS_TEXT = "<|im_end|>"

# Residual stream layout. Blocks only ever write to their own dimensions.
D_CONST = 0  # constant, never written: the output head's bias source
D_TOOLS = 1  # token is <tools>
D_OFFERED = 2  # written by the detector head: a <tools> token occurs earlier
D_NL = 3  # token ends with "\n"
D_RBRACE = 4  # token ends with "}"
D_TC_OPEN = 5  # token is <tool_call>
D_TC_CLOSE = 6  # token is </tool_call>
D_QUOTE = 7  # token ends with '"'
D_FILLER = 8  # token is the filler word
D_OUT_CALL = 9  # neuron: offered AND newline -> <tool_call>
D_OUT_END = 10  # neuron: offered AND "}" -> </tool_call>
D_OUT_FILL = 11  # neuron: offered AND quote -> filler
D_OUT_CLOSEQ = 12  # neuron: offered AND filler -> '"'
# tool-once only (D_OUT_STOP takes the first random dimension, zeroed in that model):
D_TOOL_RESPONSE = 13  # token is <tool_response>
D_RESPONDED = 14  # written by the second detector head: a <tool_response> occurs earlier
D_OUT_ANSWER = 15  # neuron: offered AND responded AND newline -> the filler word
D_OUT_STOP = 16  # neuron: offered AND responded AND filler -> EOS
D_RANDOM = 16  # first of the dimensions the random part of the model uses
N_RANDOM = N_EMBD - D_RANDOM

CONST_VALUE = 4.0
# Logit offsets the circuits aim for; the random logits of printable tokens stay within +-5.
BAN = 40.0
BOOST = 80.0
CLOSER_BIAS = 15.0

# Head 2 (second KV head) detects <tools>; it uses the last RoPE pair, the slowest one.
DETECT_HEAD = 2
DETECT_KV_HEAD = DETECT_HEAD // (N_HEAD // N_HEAD_KV)
DETECT_QK_DIM = HEAD_DIM - 2
DETECT_V_DIM = 0
DETECT_SCORE = 40.0  # softmax score of a <tools> key: dominates even 4096 other positions

# The model writes this word into every free-form JSON string, so strings always end.
FILLER = "the"

# Gains of the random weights (applied to unit-variance rows): small block outputs keep the
# constant dominant in every RMS norm, so the circuits see stable values.
GAIN_QK = 6.0
GAIN_V = 3.0
GAIN_ATTN_OUT = 0.15
GAIN_FFN_IN = 4.0
GAIN_FFN_OUT = 0.05
GAIN_OUTPUT = 3.0

PARAGRAPH = (
    "the router takes requests from many clients and hands each one to a worker that has a "
    "free slot. a worker drives one local model server and reports how many slots it has, "
    "which model it serves, and how long the context is. when a request arrives the router "
    "looks for the worker that already holds the start of the conversation in its cache, "
    "because sending the next turn to the same slot saves most of the prompt work. when no "
    "worker has the prefix, the router picks the one with the most free slots and the "
    "shortest queue. tokens stream back from the worker to the router and from the router "
    "to the client as they are made, so the client sees the answer grow word by word. if a "
    "worker goes away in the middle of a job, the router tells the client and frees the "
    "slot. the router keeps counters of requests, tokens and errors, and it shows them on a "
    "page that a monitor can read. a small model with random weights is enough to test all "
    "of this, because the tests care about the path that tokens take and not about what the "
    "words mean. the model writes plain text for chat and a tool call when tools are on "
    "offer, and it always stops at the limit that the client asked for. this keeps the tests "
    "fast, the results the same from run to run, and the whole thing small enough to build "
    "in a second on any machine that has python and numpy."
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_CHARS = _bytes_to_unicode()

# ASCII stand-in for the qwen2 pre-tokenizer regex; the paragraph is plain ASCII.
_PRETOKEN = re.compile(r"'[a-z]+|[^\r\na-zA-Z0-9]?[a-zA-Z]+|[0-9]| ?[^\sa-zA-Z0-9]+[\r\n]*|\s+")


def _encode_chars(text: str) -> str:
    return "".join(BYTE_CHARS[b] for b in text.encode())


def _training_words() -> Counter[tuple[str, ...]]:
    """Pre-tokenized chunks of the paragraph, plus each word without its leading space so
    that bare words (like the filler) become single tokens too."""
    words: Counter[tuple[str, ...]] = Counter()
    for chunk in _PRETOKEN.findall(PARAGRAPH):
        words[tuple(_encode_chars(chunk))] += 1
        if chunk.startswith(" ") and chunk[1:].isalpha():
            words[tuple(_encode_chars(chunk[1:]))] += 1
    return words


def _learn_merges(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        # Ties break on the pair text so the result never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        words = Counter({_apply_merge(w, best): c for w, c in words.items()})
    return merges


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # GGUF token text (byte-level characters for normal tokens)
    types: list[int]
    merges: list[str]
    text: list[str]  # decoded text of each token
    filler: int

    def id(self, text: str) -> int:
        return self.text.index(text)


def build_vocab(behaviour: str = "tools") -> Vocab:
    """256 byte tokens, learned merges, then the special tokens."""
    decode = {c: b for b, c in BYTE_CHARS.items()}
    tokens = [BYTE_CHARS[b] for b in range(256)]
    types = [int(gguf.TokenType.NORMAL)] * 256
    merges = _learn_merges(_training_words(), N_MERGES)
    known = set(tokens)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            tokens.append(left + right)
            types.append(int(gguf.TokenType.NORMAL))
    text = [bytes(decode[c] for c in t).decode("latin-1") for t in tokens]
    for special, kind in [
        *((s, gguf.TokenType.CONTROL) for s in SPECIAL_CONTROL),
        *((s, gguf.TokenType.USER_DEFINED) for s in SPECIAL_USER),
        *((s, gguf.TokenType.USER_DEFINED) for s in (SPECIAL_RESPONSE if behaviour == "tool-once" else ())),
    ]:
        tokens.append(special)
        types.append(int(kind))
        text.append(special)
    return Vocab(tokens, types, [f"{a} {b}" for a, b in merges], text, text.index(FILLER))


def _is_special(vocab: Vocab, token: int) -> bool:
    return vocab.types[token] != int(gguf.TokenType.NORMAL)


def _is_printable(vocab: Vocab, token: int) -> bool:
    return not _is_special(vocab, token) and all(" " <= ch <= "~" for ch in vocab.text[token])


def _embeddings(vocab: Vocab, rng: np.random.Generator) -> Matrix:
    n_vocab = len(vocab.tokens)
    emb = np.zeros((n_vocab, N_EMBD), np.float32)
    emb[:, D_CONST] = CONST_VALUE
    emb[:, D_RANDOM:] = rng.standard_normal((n_vocab, N_RANDOM)) / math.sqrt(N_RANDOM)
    for token, text in enumerate(vocab.text):
        for dim in _flag_dims(text):
            emb[token, dim] = 1.0
    emb[vocab.filler, D_FILLER] = 1.0
    return emb


def _flag_dims(text: str) -> list[int]:
    """Feature dimensions a token sets in its embedding."""
    exact = {"<tools>": D_TOOLS, "<tool_call>": D_TC_OPEN, "</tool_call>": D_TC_CLOSE}
    endings = {"\n": D_NL, "}": D_RBRACE, '"': D_QUOTE}
    dims = [dim for suffix, dim in endings.items() if text.endswith(suffix)]
    return dims + ([exact[text]] if text in exact else [])


def _random(rng: np.random.Generator, rows: int, cols: int, gain: float) -> Matrix:
    return (rng.standard_normal((rows, cols)) * gain / math.sqrt(cols)).astype(np.float32)


def _attention(rng: np.random.Generator, layer: int) -> dict[str, Matrix]:
    """Random heads read and write only the random dimensions; in layer 0 one head is the
    <tools> detector and the head sharing its KV head stays random on the other dims."""
    wq = np.zeros((N_HEAD * HEAD_DIM, N_EMBD), np.float32)
    wk = np.zeros((N_HEAD_KV * HEAD_DIM, N_EMBD), np.float32)
    wv = np.zeros((N_HEAD_KV * HEAD_DIM, N_EMBD), np.float32)
    wo = np.zeros((N_EMBD, N_HEAD * HEAD_DIM), np.float32)
    rand = slice(D_RANDOM, N_EMBD)
    wq[:, rand] = _random(rng, N_HEAD * HEAD_DIM, N_RANDOM, GAIN_QK)
    wk[:, rand] = _random(rng, N_HEAD_KV * HEAD_DIM, N_RANDOM, GAIN_QK)
    wv[:, rand] = _random(rng, N_HEAD_KV * HEAD_DIM, N_RANDOM, GAIN_V)
    wo[rand, :] = _random(rng, N_RANDOM, N_HEAD * HEAD_DIM, GAIN_ATTN_OUT)
    if layer == 0:
        _wire_detector(wq, wk, wv, wo)
    return {"attn_q": wq, "attn_k": wk, "attn_v": wv, "attn_output": wo}


def _unit() -> float:
    """Value a 1.0 flag takes after RMS norm when the constant dominates the residual."""
    return math.sqrt(N_EMBD) / math.sqrt(CONST_VALUE**2 + 3.0)


def _wire_detector(
    wq: Matrix, wk: Matrix, wv: Matrix, wo: Matrix, head: int = DETECT_HEAD, key: int = D_TOOLS, out: int = D_OFFERED
) -> None:
    """Head ``head`` writes 1 to ``out`` when a token with flag ``key`` occurs earlier."""
    q0 = head * HEAD_DIM
    k0 = head // (N_HEAD // N_HEAD_KV) * HEAD_DIM
    unit = _unit()
    # Clear the detector's rows so no random signal leaks into its score or value.
    wq[q0 : q0 + HEAD_DIM] = 0.0
    wk[k0 + DETECT_QK_DIM : k0 + HEAD_DIM] = 0.0
    wv[k0 + DETECT_V_DIM] = 0.0
    wo[:, q0 : q0 + HEAD_DIM] = 0.0
    # The next head shares this KV head: keep it off the detector's key and value dims.
    q1 = q0 + HEAD_DIM
    wq[q1 + DETECT_QK_DIM : q1 + HEAD_DIM] = 0.0
    wo[:, q1 + DETECT_V_DIM] = 0.0
    # Constant query x <tools> key: the score is DETECT_SCORE on <tools>, 0 elsewhere.
    qk = math.sqrt(DETECT_SCORE * math.sqrt(HEAD_DIM) / (CONST_VALUE * unit * unit))
    wq[q0 + DETECT_QK_DIM, D_CONST] = qk
    wk[k0 + DETECT_QK_DIM, key] = qk
    wv[k0 + DETECT_V_DIM, key] = 1.0 / unit
    wo[out, q0 + DETECT_V_DIM] = 1.0


# (output dim, condition dim) of each AND neuron; all are gated on D_OFFERED.
_AND_NEURONS = (
    (D_OUT_CALL, D_NL),
    (D_OUT_END, D_RBRACE),
    (D_OUT_FILL, D_QUOTE),
    (D_OUT_CLOSEQ, D_FILLER),
)


def _ffn(rng: np.random.Generator, layer: int) -> dict[str, Matrix]:
    gate = np.zeros((N_FF, N_EMBD), np.float32)
    up = np.zeros((N_FF, N_EMBD), np.float32)
    down = np.zeros((N_EMBD, N_FF), np.float32)
    rand = slice(D_RANDOM, N_EMBD)
    gate[:, rand] = _random(rng, N_FF, N_RANDOM, GAIN_FFN_IN)
    up[:, rand] = _random(rng, N_FF, N_RANDOM, GAIN_FFN_IN)
    down[rand, :] = _random(rng, N_RANDOM, N_FF, GAIN_FFN_OUT)
    if layer == 0:
        _wire_and_neurons(gate, up, down)
    return {"ffn_gate": gate, "ffn_up": up, "ffn_down": down}


def _wire_and_neurons(gate: Matrix, up: Matrix, down: Matrix) -> None:
    unit = _unit()
    sharpness = 8.0
    for neuron, (out_dim, cond_dim) in enumerate(_AND_NEURONS):
        gate[neuron] = 0.0
        up[neuron] = 0.0
        down[:, neuron] = 0.0
        # silu(sharpness * unit * (offered + cond - 1.5)): about +10 when both flags are
        # set, about 0 otherwise.
        gate[neuron, D_OFFERED] = sharpness
        gate[neuron, cond_dim] = sharpness
        gate[neuron, D_CONST] = -1.5 * sharpness / CONST_VALUE
        up[neuron, D_CONST] = 1.0 / (CONST_VALUE * unit)
        down[out_dim, neuron] = 1.0 / (0.5 * sharpness * unit)


def _output_head(vocab: Vocab, rng: np.random.Generator) -> Matrix:
    n_vocab = len(vocab.tokens)
    unit = _unit()
    out = np.zeros((n_vocab, N_EMBD), np.float32)
    out[:, D_RANDOM:] = _random(rng, n_vocab, N_RANDOM, GAIN_OUTPUT)
    for token in range(n_vocab):
        if not _is_printable(vocab, token):
            out[token, D_CONST] = -BAN / (CONST_VALUE * unit)

    def boost(token: int, dim: int, amount: float) -> None:
        out[token, dim] += amount / unit

    boost(vocab.id("<tool_call>"), D_OUT_CALL, BOOST)
    boost(vocab.id("\n"), D_TC_OPEN, BOOST)
    boost(vocab.id("</tool_call>"), D_OUT_END, BOOST)
    boost(vocab.id(EOS_TEXT), D_TC_CLOSE, BOOST)
    boost(vocab.filler, D_OUT_FILL, BOOST)
    boost(vocab.id('"'), D_OUT_CLOSEQ, BOOST)
    # With tools offered, close objects and arrays as soon as the grammar allows, and keep
    # optional whitespace out of the JSON.
    for text in ("}", "]", "{"):
        boost(vocab.id(text), D_OFFERED, CLOSER_BIAS)
    boost(vocab.id(" "), D_OFFERED, -CLOSER_BIAS)
    return out


def _retarget(out: Matrix, vocab: Vocab, dim: int, old: str, new: str) -> None:
    """The output-head boost that ``dim`` gave token ``old`` goes to token ``new``."""
    unit = _unit()
    out[vocab.id(old), dim] -= BOOST / unit
    out[vocab.id(new), dim] += BOOST / unit


def _wire_text(tensors: dict[str, Matrix], vocab: Vocab) -> None:
    """text: "offered AND newline" writes the filler word instead of <tool_call>, and the
    filler ends the answer (EOS) instead of closing a JSON string."""
    out = tensors["output.weight"]
    _retarget(out, vocab, D_OUT_CALL, "<tool_call>", FILLER)
    _retarget(out, vocab, D_OUT_CLOSEQ, '"', EOS_TEXT)


def _wire_tool_once(tensors: dict[str, Matrix], vocab: Vocab) -> None:
    """tool-once: a second detector (layer 0, head 0) raises D_RESPONDED after a
    <tool_response>; then the call and closing-quote neurons are off and two new neurons write
    the filler word after the newline and EOS after it."""
    unit = _unit()
    for name, tensor in tensors.items():  # free D_OUT_STOP, the first random dimension
        if (
            name == "token_embd.weight"
            or name == "output.weight"
            or name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight"))
        ):
            tensor[:, D_OUT_STOP] = 0.0
        elif name.endswith(("attn_output.weight", "ffn_down.weight")):
            tensor[D_OUT_STOP, :] = 0.0
    tensors["token_embd.weight"][vocab.id("<tool_response>"), D_TOOL_RESPONSE] = 1.0
    layer = "blk.0."
    wq, wk, wv, wo = (tensors[f"{layer}attn_{n}.weight"] for n in ("q", "k", "v", "output"))
    _wire_detector(wq, wk, wv, wo, head=0, key=D_TOOL_RESPONSE, out=D_RESPONDED)
    gate, up, down = (tensors[f"{layer}ffn_{n}.weight"] for n in ("gate", "up", "down"))
    sharpness = 8.0
    for neuron, (out_dim, _) in enumerate(_AND_NEURONS):
        if out_dim in (D_OUT_CALL, D_OUT_CLOSEQ):
            gate[neuron, D_RESPONDED] = -2.0 * sharpness
    for neuron, (out_dim, cond_dim) in enumerate(((D_OUT_ANSWER, D_NL), (D_OUT_STOP, D_FILLER)), len(_AND_NEURONS)):
        gate[neuron] = 0.0
        up[neuron] = 0.0
        down[:, neuron] = 0.0
        # silu(sharpness * unit * (offered + responded + cond - 2.5))
        gate[neuron, D_OFFERED] = sharpness
        gate[neuron, D_RESPONDED] = sharpness
        gate[neuron, cond_dim] = sharpness
        gate[neuron, D_CONST] = -2.5 * sharpness / CONST_VALUE
        up[neuron, D_CONST] = 1.0 / (CONST_VALUE * unit)
        down[out_dim, neuron] = 1.0 / (0.5 * sharpness * unit)
    out = tensors["output.weight"]
    out[vocab.filler, D_OUT_ANSWER] += BOOST / unit
    out[vocab.id(EOS_TEXT), D_OUT_STOP] += BOOST / unit


def build_tensors(vocab: Vocab, seed: int, behaviour: str = "tools") -> dict[str, Matrix]:
    """All model tensors by GGUF name, in file order."""
    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight": _embeddings(vocab, rng)}
    for layer in range(N_LAYER):
        tensors[f"blk.{layer}.attn_norm.weight"] = np.ones(N_EMBD, np.float32)
        for name, weight in _attention(rng, layer).items():
            tensors[f"blk.{layer}.{name}.weight"] = weight
        tensors[f"blk.{layer}.ffn_norm.weight"] = np.ones(N_EMBD, np.float32)
        for name, weight in _ffn(rng, layer).items():
            tensors[f"blk.{layer}.{name}.weight"] = weight
    tensors["output_norm.weight"] = np.ones(N_EMBD, np.float32)
    tensors["output.weight"] = _output_head(vocab, rng)
    if behaviour == "text":
        _wire_text(tensors, vocab)
    elif behaviour == "tool-once":
        _wire_tool_once(tensors, vocab)
    return tensors


def _write_metadata(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_name("auxot-tiny-test-model")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.id("<|endoftext|>"))
    writer.add_eos_token_id(vocab.id(EOS_TEXT))
    writer.add_pad_token_id(vocab.id("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(QWEN25_CHAT_TEMPLATE)


def make_tiny_model(path: Path, *, seed: int = 0, behaviour: str = "tools") -> Path:
    """Write the tiny test model to ``path`` (byte-identical for the same seed and behaviour)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(behaviour)
    writer = gguf.GGUFWriter(path, "llama")
    _write_metadata(writer, vocab)
    for name, tensor in build_tensors(vocab, seed, behaviour).items():
        # Norms stay F32 (ggml requires it); matrices are F16 like a converted model.
        writer.add_tensor(name, tensor if tensor.ndim == 1 else tensor.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny llama-server test model.")
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--behaviour", choices=BEHAVIOURS, default="tools")
    args = parser.parse_args(argv)
    print(make_tiny_model(args.out, seed=args.seed, behaviour=args.behaviour))


# Qwen2.5-Instruct's chat template, verbatim from llama.cpp b11434
# (models/templates/Qwen-Qwen2.5-7B-Instruct.jinja).
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


if __name__ == "__main__":
    main()
