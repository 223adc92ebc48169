"""`sputnik tasks list` and `sputnik tasks preview TASK`: see tasks, their knobs, and what the
model will be trained on and judged by (prompt, trace, answer, and the verdict of the target
completion, which must always be correct)."""
from __future__ import annotations

from sputnik.tasks import PRESETS, describe_task, format_completion, list_tasks, parse_task


def register(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="list reasoning tasks or preview their examples",
                                   description="Reasoning tasks: prompts, solution traces, gold answers, verifiers.")
    sub = parser.add_subparsers(dest="tasks_command", metavar="{list,preview}")
    listing = sub.add_parser("list", help="every task with its description and knobs")
    listing.set_defaults(func=run_list)
    preview = sub.add_parser("preview", help="print a few examples of a task with the verdict of their target completion")
    preview.add_argument("task", metavar="TASK", help="task spec name[:knob=value...] (see `sputnik tasks list`), e.g. "
                                                      "addition:max_digits=6 or rg:chain_sum:min_terms=3")
    preview.add_argument("-n", type=int, default=5, help="how many examples to print (default 5)")
    preview.add_argument("--split", choices=("train", "test"), default="train", help="which split to draw from (default train)")
    preview.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    preview.set_defaults(func=run_preview)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_list(args) -> int:
    for name in [*list_tasks(), "rg:<dataset>"]:
        description, knobs = describe_task(name)
        print(f"{name:<15} {description}")
        for knob, default, help_text in knobs:
            print(f"{'':<15}   {knob}={default!r}: {help_text}")
    print("\npresets (--tasks @NAME):")
    for name, specs in PRESETS.items():
        print(f"@{name:<26} {', '.join(specs)}")
    return 0


def run_preview(args) -> int:
    if args.n < 0:
        raise ValueError(f"-n {args.n}: must be >= 0")
    try:
        task = parse_task(args.task)
        examples = task.generate(args.n, split=args.split, seed=args.seed)
    except ImportError as e:  # the optional reasoning-gym extra
        raise ValueError(str(e)) from None
    for i, ex in enumerate(examples):
        verdict = task.verify(ex, format_completion(ex))
        print(f"=== {ex.task} #{i} ({args.split}, seed {args.seed})")
        print(f"--- prompt\n{ex.prompt}")
        print(f"--- trace\n{ex.solution or '(none)'}")
        print(f"--- answer\n{ex.answer}")
        print(f"--- verdict of the target completion: correct={verdict.correct} "
              f"well_formatted={verdict.well_formatted} ({verdict.reason})\n")
    return 0
