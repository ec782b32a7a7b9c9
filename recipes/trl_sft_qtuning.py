#!/usr/bin/env python
"""Supervised fine-tuning with TRL's SFTTrainer and Q-Tuning, with the paper's settings.

Defaults follow Wang et al. (arXiv 2509.23873), MathInstruct on SmolLM2-1.7B: LoRA r=8, per-device
batch 8 x gradient accumulation 4, cutoff 2048, 3 epochs, lr 1e-4 cosine, 25 % of samples x 50 % of
their tokens, lambda 0.5, loss on answers only. On a GPU the base model is loaded in 4-bit (QLoRA)
unless --no-load-in-4bit.

    python recipes/trl_sft_qtuning.py --model HuggingFaceTB/SmolLM2-1.7B --dataset TIGER-Lab/MathInstruct
    python recipes/trl_sft_qtuning.py --model ./my-model --dataset data.jsonl --max-steps 100

--dataset is a hub id or a local .jsonl/.json file with one of: chat ``messages``;
``prompt``/``completion``; Alpaca ``instruction``/``input``/``output`` (converted to
prompt/completion, as MathInstruct needs).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-1.7B", help="hub id or local directory")
    p.add_argument("--dataset", default="TIGER-Lab/MathInstruct", help="hub id or local .jsonl/.json file")
    p.add_argument("--split", default="train")
    p.add_argument("--output-dir", default="out/sft-qtuning")
    p.add_argument("--sample-ratio", type=float, default=0.25)
    p.add_argument("--token-ratio", type=float, default=0.5)
    p.add_argument("--neighbor-lambda", type=float, default=0.5)
    p.add_argument("--pool", choices=["step", "micro_batch"], default="step")
    p.add_argument("--no-qtuning", action="store_true", help="plain SFT, for comparison")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="QLoRA (bitsandbytes NF4); default: on when CUDA is available")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--per-device-batch-size", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=4)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def load_dataset(name: str, split: str):
    import datasets

    if os.path.isfile(name):
        ds = datasets.load_dataset("json", data_files=name, split="train")
    else:
        ds = datasets.load_dataset(name, split=split)
    cols = set(ds.column_names)
    if "messages" in cols or {"prompt", "completion"} <= cols:
        return ds
    if {"instruction", "output"} <= cols:  # Alpaca / MathInstruct
        def to_prompt_completion(row):
            extra = row.get("input") or ""
            prompt = row["instruction"] + (f"\n\n{extra}" if extra else "")
            return {"prompt": f"{prompt}\n\n", "completion": row["output"]}

        return ds.map(to_prompt_completion, remove_columns=sorted(cols))
    raise SystemExit(f"--dataset {name}: expected columns 'messages', 'prompt'/'completion' or "
                     f"'instruction'/'output', found {sorted(cols)}")


def main(argv=None):
    args = parse_args(argv)
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from qtuning_plugin import QTuning
    from qtuning_plugin.precision import describe_precision, native_bf16

    cuda = torch.cuda.is_available()
    load_in_4bit = cuda if args.load_in_4bit is None else args.load_in_4bit
    # bf16 only where the hardware computes it (Ampere+ GPUs; CPUs with AVX512-BF16 or AMX): on other
    # CPUs bf16 is emulated and 15-50x slower than fp32.
    bf16 = native_bf16()
    print(describe_precision(), flush=True)
    model_kwargs = {"dtype": torch.bfloat16 if (bf16 and cuda) else torch.float32}  # CPU: fp32 weights
    if load_in_4bit:
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16 if cuda else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, **model_kwargs)

    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_length=args.max_length,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        logging_steps=args.logging_steps,
        save_strategy="no",
        bf16=bf16,
        seed=args.seed,
        report_to="none",
        # Loss on answers only, as in the paper: TRL does it by default for prompt/completion data;
        # for chat data set assistant_only_loss=True (needs a chat template with generation marks).
        use_cpu=not cuda,
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=load_dataset(args.dataset, args.split),
                         processing_class=tokenizer, peft_config=lora)
    if not args.no_qtuning:
        QTuning(sample_ratio=args.sample_ratio, token_ratio=args.token_ratio, neighbor_lambda=args.neighbor_lambda,
                pool=args.pool).attach(trainer)
    trainer.train()
    trainer.save_model(args.output_dir)
    with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f, indent=1)
    return trainer


if __name__ == "__main__":
    main()
