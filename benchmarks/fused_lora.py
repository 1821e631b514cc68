"""A forward and backward pass of a 4-bit LoRA model, with PEFT's LoRA layers and with `fuse_lora_for_training`.

    hf-reinforce make-smollm2 --output_dir outputs/smollm2-135m-instruct
    python benchmarks/fused_lora.py --model outputs/smollm2-135m-instruct

The model is loaded in NF4 with a LoRA adapter (r=16, every linear layer, random non-zero weights) as the SmolLM2
recipes train it. Each shape is one batch of rows x tokens of random token ids: the loss is the mean log-probability
of a fixed token over the last `--scored` positions (as the REINFORCE loss scores the completion only), or the mean
of the last position's logits with `--scored 0` (a reward model's score). The two arms alternate within each repeat
(the machine may be shared); the median seconds per pass over repeats are printed with their ratio, and the largest
difference between the two arms' adapter gradients relative to the largest gradient.
"""

import argparse
import platform
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hf_reinforce.scripts import cpu_threads_per_process
from hf_reinforce.speedups.fused_lora import ORIGINAL_FORWARD, fuse_lora_for_training


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pass_with_gradients(model, input_ids: torch.Tensor, scored: int) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    if scored:
        logits = model(input_ids=input_ids, logits_to_keep=scored).logits
        loss = logits.log_softmax(-1)[..., 5].mean()
    else:
        loss = model(input_ids=input_ids, logits_to_keep=1).logits.mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return seconds, [parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad]


def set_fused(model, fused: bool) -> None:
    if fused:
        fuse_lora_for_training(model)
        return
    for module in model.modules():
        if ORIGINAL_FORWARD in module.__dict__:
            module.forward = module.__dict__.pop(ORIGINAL_FORWARD)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/smollm2-135m-instruct", help="A causal LM folder.")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["32x64x0", "32x80x48"],
        help="rows x tokens x scored positions: a reward-model batch of the SmolLM2 recipe (16 pairs of about 64 "
        "tokens), a REINFORCE batch (32 answers of up to 48 tokens after a 31-token prompt).",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=cpu_threads_per_process())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).train()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    batches = {shape: torch.randint(100, model.config.vocab_size, shape[:2]) for shape in shapes}
    seconds = {(shape, fused): [] for shape in shapes for fused in (False, True)}
    differences = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for shape in shapes:
            gradients = {}
            for fused in (False, True):
                set_fused(model, fused)
                time_taken, gradients[fused] = pass_with_gradients(model, batches[shape], shape[2])
                if repeat:
                    seconds[shape, fused].append(time_taken)
            largest = max(gradient.abs().max() for gradient in gradients[False])
            difference = max((a - b).abs().max() for a, b in zip(gradients[False], gradients[True], strict=True))
            differences[shape] = (difference / largest).item()
    print(f"machine: {platform.platform()}, {args.threads} torch threads, torch {torch.__version__}")
    print(f"model: {args.model}, NF4 + LoRA r=16 on every linear layer\n")
    print("| rows x tokens (scored) | PEFT LoRA layers (s) | fused (s) | ratio | gradient difference |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        peft, fused = (statistics.median(seconds[shape, arm]) for arm in (False, True))
        scored = f"last {shape[2]}" if shape[2] else "last position's score"
        print(
            f"| {shape[0]} x {shape[1]} ({scored}) | {peft:.2f} | {fused:.2f} | {fused / peft:.2f}x "
            f"| {differences[shape]:.1e} |"
        )


if __name__ == "__main__":
    main()
