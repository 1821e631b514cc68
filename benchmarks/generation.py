"""Generation speed of a 4-bit LoRA model with and without `dequantize_for_inference`, inverse-CDF sampling and the
LM head in vocabulary blocks.

    hf-reinforce make-smollm2 --output_dir outputs/smollm2-135m-instruct
    python benchmarks/generation.py --model outputs/smollm2-135m-instruct

The model is loaded in NF4 with a LoRA adapter (r=16, every linear layer, random non-zero weights) as the
SmolLM2 reinforce recipe trains it, in training mode as the trainer generates. Each batch size generates every row
to `--tokens` tokens (`min_new_tokens`) from a chat prompt four ways: with the 4-bit layers as bitsandbytes and peft
run them; through the dequantised, adapter-merged copies; through those copies with each token drawn by
`InverseCdfSampler` instead of `torch.multinomial`; and with the LM head computed in blocks of the vocabulary as well
(`lm_head_in_blocks`), as `ReinforceTrainer` with `inverse_cdf_sampling` and `hf-reinforce real-demo` generate on a
CPU. The four alternate within each repeat (the machine may be shared), and the median seconds per batch over repeats
are reported with their ratios to the first.
"""

import argparse
import platform
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from hf_reinforce.scripts import cpu_threads_per_process
from hf_reinforce.speedups.dequantized import ORIGINAL_FORWARD, dequantize_for_inference
from hf_reinforce.speedups.sampling import InverseCdfSampler, lm_head_in_blocks


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# (dequantize_for_inference, inverse-CDF sampling, LM head in blocks) of each arm, in the order they run and print
ARMS = ((False, False, False), (True, False, False), (True, True, False), (True, True, True))


def seconds_to_generate(model, tokenizer, batch_size: int, tokens: int, inverse_cdf: bool) -> float:
    chat = [{"role": "user", "content": "Write a one-sentence review of a mattress."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text] * batch_size, return_tensors="pt", add_special_tokens=False)
    sampling = {"do_sample": False, "logits_processor": [InverseCdfSampler()]} if inverse_cdf else {"do_sample": True}
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    return time.perf_counter() - start


def set_routing(model, routed: bool, head_in_blocks: bool) -> None:
    """Route the 4-bit layers through their dequantised copies, or back through bitsandbytes and peft; compute the LM
    head in vocabulary blocks, or in one product."""
    model.get_output_embeddings().__dict__.pop("forward", None)
    if head_in_blocks:
        lm_head_in_blocks(model)
    if routed:
        dequantize_for_inference(model)
        return
    for module in model.modules():
        if ORIGINAL_FORWARD in module.__dict__:
            module.forward = module.__dict__.pop(ORIGINAL_FORWARD)


def lm_head_milliseconds(model, rows: int, repeats: int = 7) -> tuple[float, float]:
    """Median ms of one decoding step's LM head product over `rows` rows: in one product, then in blocks."""
    head = model.get_output_embeddings()
    hidden = torch.randn(rows, 1, head.in_features)
    times = {False: [], True: []}
    with torch.no_grad():
        for _ in range(repeats):
            for in_blocks in (False, True):
                head.__dict__.pop("forward", None)
                if in_blocks:
                    lm_head_in_blocks(model)
                start = time.perf_counter()
                head(hidden)
                times[in_blocks].append(1000 * (time.perf_counter() - start))
    return statistics.median(times[False]), statistics.median(times[True])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/smollm2-135m-instruct", help="A causal LM folder.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=cpu_threads_per_process())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    seconds = {(size, arm): [] for size in args.batch_sizes for arm in ARMS}
    for size in args.batch_sizes:
        for routed, inverse_cdf, head_in_blocks in ARMS:  # warm-up: first calls allocate, routing fills the copies
            set_routing(model, routed, head_in_blocks)
            seconds_to_generate(model, tokenizer, size, 4, inverse_cdf)
    for _ in range(args.repeats):
        for size in args.batch_sizes:
            for arm in ARMS:
                routed, inverse_cdf, head_in_blocks = arm
                set_routing(model, routed, head_in_blocks)
                seconds[size, arm].append(seconds_to_generate(model, tokenizer, size, args.tokens, inverse_cdf))
    print(f"machine: {platform.platform()}, {args.threads} torch threads, torch {torch.__version__}")
    print(f"model: {args.model}, NF4 + LoRA r=16 on every linear layer, {args.tokens} tokens per row\n")
    print(
        "| answers per batch | 4-bit layers (s) | dequantize_for_inference (s) | ratio | + inverse-CDF sampling (s) "
        "| ratio | + LM head in blocks (s) | ratio | s per answer, all three |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.batch_sizes:
        plain, routed, sampled, blocks = (statistics.median(seconds[size, arm]) for arm in ARMS)
        print(
            f"| {size} | {plain:.2f} | {routed:.2f} | {routed / plain:.2f}x | {sampled:.2f} | {sampled / plain:.2f}x "
            f"| {blocks:.2f} | {blocks / plain:.2f}x | {blocks / size:.3f} |"
        )
    print("\n| rows | LM head, one product (ms) | in blocks (ms) | ratio |\n|---|---|---|---|")
    for size in args.batch_sizes:
        whole, in_blocks = lm_head_milliseconds(model, size)
        print(f"| {size} | {whole:.1f} | {in_blocks:.1f} | {in_blocks / whole:.2f}x |")


if __name__ == "__main__":
    main()
