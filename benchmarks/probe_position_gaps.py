"""Position gaps' decoding mismatch: a model trained with SFT position gaps, teacher-forced on gold
completions with the positions decoding uses (consecutive) and with positions drawn as in training.

    .venv/bin/python benchmarks/probe_position_gaps.py --model DIR --tokenizer DIR --task SPEC
        [--problems 64] [--position_gaps 8] [--prompt_gaps 0] [--seed 0]

For each of --problems test-split problems of the task, the gold completion (format_completion) is
scored token by token under teacher forcing: a sequence is right when every completion token is the
argmax. Printed: the share of sequences right and of tokens right, for consecutive positions and for
one gapped draw per sequence (train/position_gaps.py; --position_gaps after line ends, --prompt_gaps
after a prompt's digits). A model that reads the gapped draws right but not the consecutive ones has
never trained on decoding's positions (docs/benchmarks.md, stop 37).
"""
from __future__ import annotations

import argparse
import json

import torch

from sputnik.tasks import format_completion, parse_task
from sputnik.train.loading import load_model, load_tokenizer
from sputnik.train.position_gaps import Gaps, draw_positions


def teacher_forced(model, tok, examples, gaps: Gaps) -> dict:
    sequences = tokens = tokens_right = 0
    for ex in examples:
        ids, mask = tok.render_chat(ex.prompt, format_completion(ex))
        x_BT = torch.tensor([ids])
        kw = {"positions_BT": draw_positions(x_BT, tok, gaps, model.config.max_position_embeddings)} if gaps else {}
        with torch.no_grad():
            predicted = model(x_BT, **kw).logits[0, :-1].argmax(-1)
        scored = torch.tensor(mask[1:], dtype=torch.bool)
        right = (predicted == x_BT[0, 1:])[scored]
        sequences += bool(right.all())
        tokens_right += int(right.sum())
        tokens += len(right)
    return {"sequences_right": sequences / len(examples), "tokens_right": tokens_right / tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--task", required=True,
                   help="a task spec, e.g. addition:digit_order=lsb:index_hints=true:min_digits=4:max_digits=4")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--position_gaps", type=int, default=8)
    p.add_argument("--prompt_gaps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model).eval(), load_tokenizer(args.tokenizer)
    examples = parse_task(args.task).generate(args.problems, split="test", seed=args.seed)
    result = {"task": args.task, "problems": len(examples),
              "consecutive": teacher_forced(model, tok, examples, Gaps()),
              "gapped": teacher_forced(model, tok, examples, Gaps(args.position_gaps, args.prompt_gaps))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
