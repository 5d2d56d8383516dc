"""Deterministic tiny random-weight Llama model for tests and local runs.

`make_tiny_model` writes a complete Hugging Face style model directory
(config, safetensors weights, a real byte-level BPE tokenizer trained locally,
tokenizer/generation configs) without downloading anything. The same
``seed`` on the same Python/torch/tokenizers versions gives byte-identical
files. The tokenizer corpus is built from standard-library docstrings, so a
different Python version may train a (slightly) different tokenizer; the
vocabulary size, special-token ids and the weights do not depend on it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
)

VOCAB_SIZE = 8192
"""Total vocabulary size including the special tokens (a multiple of 64)."""

MODEL_CONFIG: dict[str, int | float] = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}

_FILE_NAMES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

LINEAR_STD = 0.02
EMBEDDING_STD = 0.05

# Llama-3 style chat template: BOS, then one header-delimited turn per message. Tools
# follow Qwen 2.5 / Hermes: with ``tools``, a system turn lists them (merged with a first
# system message) and asks for <tool_call> blocks, which assistant turns with
# ``tool_calls`` render back; a tool result is a "tool" turn inside <tool_response>.
# Without tools and tool messages it renders exactly as the plain Llama-3 template did.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] | trim }}{{ '\\n\\n' }}"
    "{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|eot_id|>' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] %}{{ message['content'] | trim }}{% endif %}"
    "{% for tool_call in message['tool_calls'] %}"
    "{% if tool_call['function'] is defined %}{% set tool_call = tool_call['function'] %}{% endif %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + tool_call['name'] + '\", \"arguments\": ' }}"
    "{% if tool_call['arguments'] is string %}{{ tool_call['arguments'] }}"
    "{% else %}{{ tool_call['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|eot_id|>' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|start_header_id|>tool<|end_header_id|>\\n\\n<tool_response>\\n' }}"
    "{{ message['content'] | trim }}"
    "{{ '\\n</tool_response><|eot_id|>' }}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}"
    "{{ '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# Fixed, sorted list of pure-Python-ish standard-library modules whose
# docstrings form the tokenizer training corpus.
CORPUS_MODULES: tuple[str, ...] = tuple(
    sorted(
        [
            "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar",
            "cmath", "codecs", "collections", "concurrent.futures", "configparser",
            "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
            "difflib", "doctest", "email", "enum", "fnmatch", "fractions",
            "functools", "gettext", "glob", "hashlib", "heapq", "html",
            "http.client", "inspect", "io", "itertools", "json", "locale",
            "logging", "math", "mimetypes", "operator", "optparse", "os",
            "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets",
            "selectors", "shlex", "shutil", "socket", "statistics", "string",
            "struct", "subprocess", "tarfile", "tempfile", "textwrap",
            "threading", "timeit", "tokenize", "traceback", "typing",
            "unicodedata", "unittest", "urllib.parse", "uuid", "warnings",
            "weakref", "xml.etree.ElementTree", "zipfile", "colorsys",
            "contextvars", "dis", "filecmp", "graphlib", "ipaddress",
            "keyword", "linecache", "mailbox", "netrc", "numbers", "plistlib",
            "reprlib", "sched", "smtplib", "stat", "tomllib", "zoneinfo",
            "imaplib", "ftplib", "poplib", "http.server", "http.cookies",
            "urllib.request", "xml.dom.minidom", "wave", "zlib", "gzip", "bz2",
            "lzma", "hmac", "binascii", "quopri", "getopt", "cmd", "code",
            "runpy", "pkgutil", "importlib", "sysconfig", "platform", "errno",
        ]
    )
)

# A few non-ASCII lines so that multi-byte characters get merges too.
_EXTRA_CORPUS = (
    "Grüße aus München! Ça va très bien, merci. ¿Dónde está la estación?",
    "Привет, мир! Как дела? Всё хорошо.",
    "こんにちは世界。今日はいい天気ですね。",
    "你好，世界！今天天气很好。",
    "안녕하세요, 세계! 🙂 🚀 🎉 👍 — “quotes” and ‘more’ … ∑ ∞ ≤ ≥ π",
)


def build_corpus() -> list[str]:
    """Return the deterministic list of training documents.

    Docstrings of ``CORPUS_MODULES`` (module, then public classes/functions
    defined in it, then public methods of those classes), in sorted order.
    Modules that fail to import are skipped.
    """
    docs: list[str] = []
    with warnings.catch_warnings():
        # e.g. typing.io / typing.re warn when their __doc__ is read.
        warnings.simplefilter("ignore")
        for module_name in CORPUS_MODULES:
            _module_docs(docs, module_name)
    docs.extend(_EXTRA_CORPUS)
    return docs


def _module_docs(docs: list[str], module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    _append_doc(docs, module)
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = vars(module)[attr]
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        _append_doc(docs, obj)
        if inspect.isclass(obj):
            for method_name in sorted(vars(obj)):
                method = vars(obj)[method_name]
                if not method_name.startswith("_") and inspect.isfunction(method):
                    _append_doc(docs, method)


def _append_doc(docs: list[str], obj: object) -> None:
    doc = inspect.getdoc(obj)
    if doc:
        docs.append(doc)


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose special tokens take the last ids.

    The BPE model is trained to ``vocab_size - len(SPECIAL_TOKENS)`` entries and
    the special tokens are appended afterwards (as in Llama 3).
    """
    if corpus is None:
        corpus = build_corpus()
    base_size = vocab_size - len(SPECIAL_TOKENS)
    if base_size <= 256:
        raise ValueError(f"vocab_size too small for a byte-level BPE: {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    if tok.get_vocab_size() != base_size:
        raise ValueError(
            f"corpus too small: trained {tok.get_vocab_size()} tokens, wanted {base_size}"
        )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def _llama_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random HF-Llama-named float32 tensors drawn in a fixed order."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    head_dim = config["head_dim"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal((vocab, hidden), EMBEDDING_STD)
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(hidden)
        tensors[f"{p}.self_attn.q_proj.weight"] = normal((q_dim, hidden), LINEAR_STD)
        tensors[f"{p}.self_attn.k_proj.weight"] = normal((kv_dim, hidden), LINEAR_STD)
        tensors[f"{p}.self_attn.v_proj.weight"] = normal((kv_dim, hidden), LINEAR_STD)
        tensors[f"{p}.self_attn.o_proj.weight"] = normal((hidden, q_dim), LINEAR_STD)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden)
        tensors[f"{p}.mlp.gate_proj.weight"] = normal((inter, hidden), LINEAR_STD)
        tensors[f"{p}.mlp.up_proj.weight"] = normal((inter, hidden), LINEAR_STD)
        tensors[f"{p}.mlp.down_proj.weight"] = normal((hidden, inter), LINEAR_STD)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal((vocab, hidden), LINEAR_STD)
    return tensors


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny Llama model into ``out_dir`` (created if needed).

    Files: ``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``generation_config.json``. Existing files of those names are overwritten.
    Returns ``out_dir`` as a ``Path``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    bos_id = tok.token_to_id(BOS_TOKEN)
    eos_id = tok.token_to_id(EOS_TOKEN)
    eot_id = tok.token_to_id(EOT_TOKEN)

    config: dict = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        **MODEL_CONFIG,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": LINEAR_STD,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
    }
    _write_json(out / "config.json", config)

    save_file(_llama_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})

    tok.save(str(out / "tokenizer.json"), pretty=False)
    added_tokens_decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": added_tokens_decoder,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MODEL_CONFIG["max_position_embeddings"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN})
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": [eos_id, eot_id], "do_sample": False},
    )
    for name in _FILE_NAMES:
        os.chmod(out / name, 0o644)  # safetensors writes 0600
    return out


def ensure_tiny_model(path: str | Path, *, seed: int = 0) -> Path:
    """Return ``path``, writing the tiny model there first if ``config.json`` is absent.

    The model is built in a sibling temporary directory and renamed into place,
    so an interrupted run never leaves a half-written model at ``path``. If a
    concurrent caller wins the race, its model is kept. ``path`` may be an
    empty directory; a non-empty one without ``config.json`` is an error. A tiny
    model written by an older version gets the current ``CHAT_TEMPLATE``.
    """
    target = Path(path)
    if (target / "config.json").is_file():
        _refresh_chat_template(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        make_tiny_model(tmp, seed=seed)
        os.chmod(tmp, 0o755)  # mkdtemp creates it 0700
        try:
            os.replace(tmp, target)  # succeeds if target is absent or an empty dir
        except OSError:
            if (target / "config.json").is_file():
                return target  # another process finished first
            raise ValueError(f"refusing to overwrite non-empty directory without config.json: {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _refresh_chat_template(model_dir: Path) -> None:
    """Rewrite ``tokenizer_config.json`` of a tiny model whose chat template is stale, to the
    bytes ``make_tiny_model`` writes now (nothing else depends on the template). Directories
    that are not this tiny model are left alone; a read-only one only warns."""
    path = model_dir / "tokenizer_config.json"
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        tok_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or not isinstance(tok_config, dict):
        return
    is_tiny = config.get("vocab_size") == VOCAB_SIZE and all(config.get(k) == v for k, v in MODEL_CONFIG.items())
    if not is_tiny or tok_config.get("chat_template") == CHAT_TEMPLATE:
        return
    tok_config["chat_template"] = CHAT_TEMPLATE
    tmp = model_dir / f".tokenizer_config.json.tmp-{os.getpid()}"
    try:
        _write_json(tmp, tok_config)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not update the chat template of {model_dir}: {e}", stacklevel=3)
        tmp.unlink(missing_ok=True)


def tiny_model_digest(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file in ``model_dir`` (by file name), for determinism checks."""
    d = Path(model_dir)
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.is_file()
    }
