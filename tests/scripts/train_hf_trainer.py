"""A tiny GPT-2, built from a config (nothing downloaded), trained by the Hugging Face
``Trainer`` on CPU at a learning rate far too high (``--lr``, default 1): the loss diverges.

The rate and the clipping threshold live in ``TrainingArguments``; the data are counting
sequences made in code.
"""

import argparse
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class Sequences(Dataset):
    """Counting sequences modulo the vocabulary: each token is the previous one plus a step."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="hf_rate_"),
        learning_rate=args.lr, max_steps=args.steps, per_device_train_batch_size=16,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=Sequences(512, 16, 64))
    trainer.train()


if __name__ == "__main__":
    main()
