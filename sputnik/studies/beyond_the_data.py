"""Study `beyond_the_data`: reasoning the traces never showed (length generalisation by RL).

A task family with a length knob (`family`: additions of n digits, or word problems of n steps). From
the speedrun's pretrained base (which read 1-4 digit additions and subtractions), for each seed:

    SFT            SFT on `sft_examples` gold traces of lengths 1..`trained_length`
    + GRPO         the SFT model, then GRPO on longer problems (`rl_lengths`, answers only: no trace of
                   that length exists anywhere in training), prompts split over the lengths by
                   learnability (most prompts where the group's samples disagree)
    SFT alone      SFT on the same short traces for as many steps as SFT and GRPO together cost
                   (FLOPs from the ledger, asserted equal within 5%)

Each model is evaluated greedily on held-out problems of exactly n for every n in `eval_lengths`
(test split: hash-disjoint from every training split, the longer lengths included).
Public anchors: self-improvement by filtered self-generated data takes transformers from 10- to
100-digit addition (Lee et al., 2025); Abacus embeddings reach 99% on 100-digit addition after
training on 20 (McLeish et al., 2024). With the defaults the model has plain RoPE and writes its
digits least-significant first in the trace, so each trace line needs the operands' i-th digits: the
position lookup it never did past `trained_length` is exactly what has to generalise. A word
problem's steps are sentences, found by their content rather than their position.

The positional option (`--positions abacus`, model/abacus.py) gives the base model Abacus place
embeddings (a zero table, trained from the SFT stage on with random offsets); it is meant for
`--digit_order lsb` (every number least significant digit first, so the i-th digit of each operand and
of the answer share a place) and `--trace none` (the answer's digits are one run, so each answer digit
knows its place; a column trace's lines do not). A variant writes to its own study directory
(beyond_the_data_<positions>_<order>_<trace>[_hints][_pad<N>][_gaps<N>][_promptgaps<N>][_rows<P>][_places]
[_replay<N>]), so the arms of different options never mix.

The format option `--index_hints true` (with `--digit_order lsb`) tags every digit with a place letter
(index hints, Zhou et al., 2023; tasks/arithmetic.py): each trace line can find its digits by letter,
so no lookup needs to depend on how long the numbers are, and a longer problem only has more lines.
`--position_gaps N` trains SFT with random RoPE gaps after each line end (train/position_gaps.py), so
that the lookups the model learns go by those letters rather than by distance; `--prompt_gaps N` also
opens gaps between the prompt's places, so that neither "the k-th place from the bracket" nor "the
place two tokens on" fits every draw, and `--gapped_rows P` gaps only a share of the rows (decoding's
consecutive positions stay a trained case). `--pad_places N` writes every number with N places, zeros on
top, so every trace has N lines. What these buy (so far, not a 6-digit sum) is in docs/benchmarks.md.
`--rl_reward places` adds the share of answer places right to GRPO's reward (tasks/arithmetic.place_credit):
a sample that gets one more place of a longer sum right is reinforced before any sample is exactly right.

`--rl_replay_steps N` adds a second GRPO round (self-improvement in two rounds): the first round's prompts
are all longer than the traces, so it may learn the longer sum by moving its line count up by one and
lose the trained length; the second round splits its prompts evenly over the longest trained length and
the GRPO lengths (still answers only), so the two counts must coexist and the count has to come from
the problem. Its rows: "SFT + GRPO, round 1" and "SFT + GRPO" (after both); SFT alone gets both rounds'
FLOPs.

    sputnik study beyond_the_data
    sputnik study beyond_the_data --positions abacus --digit_order lsb --trace none
    sputnik study beyond_the_data --digit_order lsb --index_hints true --position_gaps 8 --rl_reward places
    sputnik study beyond_the_data --digit_order lsb --index_hints true --position_gaps 8 --rl_reward places \
        --rl_replay_steps 300
    sputnik study beyond_the_data --scale 0.1 --seeds 0   # a smoke run
"""
from __future__ import annotations

from dataclasses import dataclass

from sputnik.common import print0
from sputnik.config import add_config_args, config_from_args, knob, save_config
from sputnik.studies import runner as R

ARMS = ("SFT", "SFT + GRPO", "SFT alone")
ROUND_1 = "SFT + GRPO, round 1"  # with --rl_replay_steps: the first round's model, before the replay round
# a task spec with the length n in it, and what n counts
FAMILIES = {"addition": ("addition:min_digits={n}:max_digits={n}", "digits"),
            "word_problems": ("word_problems:steps={n}", "steps")}


@dataclass
class Config(R.StudyConfig):
    family: str = knob("addition", "the task family: addition (n digits) or word_problems (n steps)",
                       choices=tuple(FAMILIES))
    trained_length: int = knob(4, "SFT traces: lengths 1..N", min=1, max=20)
    rl_lengths: list[int] = knob(default_factory=lambda: [5, 6], help="GRPO prompt lengths (answers only)")
    eval_lengths: list[int] = knob(default_factory=lambda: [4, 5, 6, 7], help="held-out lengths evaluated")
    sft_examples: int = knob(4000, "SFT traces (lengths 1..trained_length, equally many of each)", min=1)
    sft_steps: int = knob(500, "SFT steps (16 examples each)", min=1)
    rl_steps: int = knob(150, "GRPO steps", min=1)
    rl_prompts_per_step: int = knob(32, "GRPO prompts per step", min=1)
    rl_group_size: int = knob(8, "GRPO samples per prompt", min=2)
    rl_temperature: float = knob(1.0, "GRPO rollout temperature", min=0.01)
    rl_lr: float = knob(2e-4, "GRPO learning rate (constant)", min=0.0)
    max_new_tokens: int = knob(160, "completion budget (a 7-digit addition trace is ~110 tokens)", min=1)
    positions: str = knob("rope", "rope: the base model as it is; abacus: add Abacus place embeddings to it "
                          "(model/abacus.py) before SFT", choices=("rope", "abacus"))
    abacus_max_index: int = knob(32, "abacus: places the table holds", min=2, max=4096)
    abacus_train_offset: int = knob(20, "abacus: random place offset 0..K per training sequence", min=0)
    digit_order: str = knob("msb", "addition: msb (as usual) or lsb (every number least significant digit first)",
                            choices=("msb", "lsb"))
    trace: str = knob("columns", "addition: columns (a worked line per column) or none (the answer alone)",
                      choices=("columns", "none"))
    index_hints: bool = knob(False, "addition: every digit tagged with a place letter (index hints; needs "
                                    "--digit_order lsb)")
    position_gaps: int = knob(0, "SFT: RoPE positions skip a random 0..N after each line end "
                                 "(train/position_gaps.py; 0 = off)", min=0)
    pad_places: int = knob(0, "addition with index hints: every number written with at least N places, zeros on "
                              "top (N > trained_length + 1: every trace has N lines; 0 = off)", min=0, max=26)
    prompt_gaps: int = knob(0, "SFT: RoPE positions also skip a random 0..N after every digit of the prompt, "
                               "so places are found by letter, not by distance (train/position_gaps.py; 0 = off)",
                            min=0)
    gapped_rows: float = knob(1.0, "SFT: the share of rows with position/prompt gaps (the rest keep decoding's "
                                   "consecutive positions)", min=0.0, max=1.0)
    rl_reward: str = knob("exact", "GRPO's reward: exact (the verifier: 1 for an exact answer, + the format bonus) or "
                                   "places (that, plus the share of answer places right: index hints only)",
                          choices=("exact", "places"))
    rl_replay_steps: int = knob(0, "a second GRPO round of N steps, prompts split evenly over trained_length and "
                                   "rl_lengths (the trained length replayed; 0 = one round)", min=0)

    def __post_init__(self):
        if not self.rl_lengths or not self.eval_lengths:
            raise ValueError("rl_lengths and eval_lengths need at least one length each")
        if min(self.rl_lengths) <= self.trained_length:
            raise ValueError(f"rl_lengths={self.rl_lengths}: GRPO's lengths must exceed trained_length={self.trained_length} "
                             "(the study is about lengths no trace showed)")
        if self.family != "addition" and ((self.digit_order, self.trace) != ("msb", "columns") or self.index_hints):
            raise ValueError(f"digit_order / trace / index_hints are addition's knobs (family={self.family!r})")
        if self.rl_reward == "places" and not self.index_hints:
            raise ValueError("rl_reward=places scores place letters: add --index_hints true")
        if self.pad_places and not self.index_hints:
            raise ValueError("pad_places pads index-hinted numbers: add --index_hints true")
        if self.pad_places and self.pad_places <= max(self.eval_lengths + self.rl_lengths):
            raise ValueError(f"pad_places={self.pad_places} must exceed every GRPO and evaluated length "
                             f"(max {max(self.eval_lengths + self.rl_lengths)}): each problem then has the same places")
        if self.index_hints and self.digit_order != "lsb":
            raise ValueError("index_hints writes digits least significant first: add --digit_order lsb")
        if self.positions == "abacus" and self.abacus_train_offset >= self.abacus_max_index:
            raise ValueError(f"abacus_train_offset={self.abacus_train_offset} must be < abacus_max_index={self.abacus_max_index}")

    def task(self, n: int) -> str:
        spec = FAMILIES[self.family][0].format(n=n)
        if (self.digit_order, self.trace) != ("msb", "columns"):
            spec += f":digit_order={self.digit_order}:trace={self.trace}"
        if self.index_hints:
            spec += ":index_hints=true"
        if self.pad_places:
            spec += f":pad_places={self.pad_places}"
        return spec

    @property
    def name(self) -> str:
        """The study directory: the published default, or one per positional option and format."""
        if (self.positions, self.digit_order, self.trace, self.index_hints, self.pad_places, self.position_gaps,
                self.prompt_gaps, self.gapped_rows, self.rl_reward, self.rl_replay_steps) == \
                ("rope", "msb", "columns", False, 0, 0, 0, 1.0, "exact", 0):
            return "beyond_the_data"
        return (f"beyond_the_data_{self.positions}_{self.digit_order}_{self.trace}" + "_hints" * self.index_hints
                + (f"_pad{self.pad_places}" if self.pad_places else "")
                + (f"_gaps{self.position_gaps}" if self.position_gaps else "")
                + (f"_promptgaps{self.prompt_gaps}" if self.prompt_gaps else "")
                + (f"_rows{self.gapped_rows:g}" if self.gapped_rows < 1 else "")
                + "_places" * (self.rl_reward == "places")
                + (f"_replay{self.rl_replay_steps}" if self.rl_replay_steps else ""))

    def arms(self) -> tuple[str, ...]:
        return ARMS if not self.rl_replay_steps else (ARMS[0], ROUND_1, *ARMS[1:])


def run(cfg: Config) -> dict:
    r = cfg.runner(cfg.name)
    speedrun, base_ids = cfg.base()
    save_config(cfg, r.out / "study_config.json")
    base = speedrun["sft"]["init"]
    sft = dict(R.own_settings(speedrun["sft"]), init=base, tasks=[cfg.task(n) for n in range(1, cfg.trained_length + 1)],
               num_examples=cfg.sft_examples, max_len=256, max_new_tokens=cfg.max_new_tokens, eval_examples=0, eval_every=0,
               position_gaps=cfg.position_gaps, prompt_gaps=cfg.prompt_gaps, gapped_rows=cfg.gapped_rows)
    sft.pop("model", None)
    if cfg.positions == "abacus":  # added to the loaded base (a zero table), then trained by SFT
        sft["model"] = dict(abacus_max_index=cfg.abacus_max_index, abacus_train_offset=cfg.abacus_train_offset)
    rl = dict(R.own_settings(speedrun["rl"]), tasks=[cfg.task(n) for n in cfg.rl_lengths], task_sampling="learnability",
              prompts_per_step=cfg.rl_prompts_per_step, group_size=cfg.rl_group_size, temperature=cfg.rl_temperature,
              max_new_tokens=cfg.max_new_tokens, steps=max(1, round(cfg.rl_steps * cfg.scale)), eval_every=0,
              eval_examples=50, optim=dict(speedrun["rl"]["optim"], lr=cfg.rl_lr), health=dict(stop_on_pathology=False))
    if cfg.rl_reward == "places":  # a dense reward from the verifier alone: still no trace of these lengths
        rl["reward_fn"] = "sputnik.tasks.arithmetic:place_credit"
    steps = max(1, round(cfg.sft_steps * cfg.scale))
    for seed in cfg.seeds:
        name = f"seed{seed}"
        short = r.stage(f"{name}/sft", "sft", dict(sft, steps=steps, seed=seed, checkpoint_every=steps), base_ids)
        grpo = r.stage(f"{name}/grpo", "rl", dict(rl, init=short.model, seed=seed, checkpoint_every=rl["steps"]),
                       short.run_ids)
        arms = [("SFT", short, short.flops, short.wall_s)]
        last, budget, wall = grpo, short.flops + grpo.flops, short.wall_s + grpo.wall_s
        if cfg.rl_replay_steps:
            replay_steps = max(1, round(cfg.rl_replay_steps * cfg.scale))
            replay = dict(rl, tasks=[cfg.task(n) for n in [cfg.trained_length, *cfg.rl_lengths]], task_sampling="round_robin",
                          steps=replay_steps, init=grpo.model, seed=seed, checkpoint_every=replay_steps)
            arms.append((ROUND_1, grpo, budget, wall))
            last = r.stage(f"{name}/grpo_replay", "rl", replay, grpo.run_ids)
            budget, wall = budget + last.flops, wall + last.wall_s
        arms.append(("SFT + GRPO", last, budget, wall))
        alone, ratio = r.stage_at_flops(f"{name}/sft_alone", "sft", dict(sft, seed=seed), budget, short.flops / steps,
                                        base_ids)
        arms.append(("SFT alone", alone, alone.flops, alone.wall_s))
        for arm, run, flops, wall in arms:
            row = dict(arm=arm, seed=seed, flops=flops, wall_s=wall, compute_ratio=ratio if arm == "SFT alone" else 1.0)
            for n in cfg.eval_lengths:
                ev = r.evaluate(run, cfg.task(n), problems=cfg.sampled_problems, samples=1, temperature=cfg.temperature,
                                max_new_tokens=cfg.max_new_tokens, greedy_problems=cfg.eval_problems)
                row[f"length_{n}"] = ev["greedy"]
            r.add(**row)
    return summarize(cfg, r)


def summarize(cfg: Config, r: R.Runner) -> dict:
    metrics = tuple(f"length_{n}" for n in cfg.eval_lengths)
    table = R.aggregate(r.rows, ("arm",), metrics)
    by = {e["arm"]: e for e in table}
    n, unit = cfg.eval_problems, FAMILIES[cfg.family][1]
    option = "" if cfg.name == "beyond_the_data" else (
        f"Positions: {'Abacus place embeddings added to the base (max place ' + str(cfg.abacus_max_index) + ', training offset 0..' + str(cfg.abacus_train_offset) + ')' if cfg.positions == 'abacus' else 'the base model as it is (RoPE)'}; "
        f"digits {'least significant first' if cfg.digit_order == 'lsb' else 'as usual'}; "
        f"{'answer only (no trace)' if cfg.trace == 'none' else 'a worked line per column'}"
        f"{'; index hints (a place letter before every digit)' if cfg.index_hints else ''}"
        f"{f'; every number padded with zeros to {cfg.pad_places} places' if cfg.pad_places else ''}"
        f"{f'; SFT with RoPE gaps of 0..{cfg.position_gaps} after each line end' if cfg.position_gaps else ''}"
        f"{f'; SFT with RoPE gaps of 0..{cfg.prompt_gaps} after every digit of the prompt' if cfg.prompt_gaps else ''}"
        f"{f' (gaps in a share {cfg.gapped_rows:g} of the rows)' if cfg.gapped_rows < 1 else ''}"
        f"{'; GRPO rewards the share of answer places right besides the exact answer' if cfg.rl_reward == 'places' else ''}"
        f"{f'; a second GRPO round of {cfg.rl_replay_steps} steps replays {cfg.trained_length} {FAMILIES[cfg.family][1]} beside the GRPO lengths' if cfg.rl_replay_steps else ''}. ")
    lines = [f"# Study: {cfg.name}", "",
             f"{option}Family `{cfg.task('n')}`. SFT traces: 1–{cfg.trained_length} {unit}; GRPO prompts: {cfg.rl_lengths} {unit}, "
             f"answers only. Held-out: {n} test-split problems of exactly each length (greedy exact match). Seeds {cfg.seeds}. "
             f"Each cell: mean over seeds [95% t-interval over seeds] (each seed). FLOPs and wall-clock: training only, "
             f"from the ledger (the shared pretrained base excluded).", "",
             "| arm | " + " | ".join(f"{x} {unit}" for x in cfg.eval_lengths) + " | training FLOPs | wall-clock (s) |",
             "|---|" + "---|" * len(metrics) + "---|---|"]
    for e in table:
        lines.append(f"| {e['arm']} | " + " | ".join(R.cell(e.get(m)) for m in metrics)
                     + f" | {e['flops']['mean']:.3g} | {e['wall_s']['mean']:.0f} |")
    target = 6 if 6 in cfg.eval_lengths else max(cfg.eval_lengths)
    headline = None
    if "SFT + GRPO" in by and "SFT alone" in by:
        g, a = by["SFT + GRPO"][f"length_{target}"], by["SFT alone"][f"length_{target}"]
        interval = "" if g["low"] != g["low"] else f" [{g['low']:.2f}, {g['high']:.2f}]"
        headline = (f"{cfg.name} ({cfg.family}, {len(cfg.seeds)} seed{'s' * (len(cfg.seeds) > 1)}, {n} held-out): after SFT on ≤ "
                    f"{cfg.trained_length} {unit}, GRPO without traces reaches {g['mean']:.2f}{interval} at {target} {unit}; "
                    f"SFT alone at equal FLOPs {a['mean']:.2f}")
        lines[1:1] = ["", f"**{headline}**"]
    lines += ["", "![accuracy against compute](beyond_the_data.png)"]
    R.plot(r.out / "beyond_the_data.png", [(arm, [by[arm]]) for arm in cfg.arms() if arm in by], f"length_{target}",
           f"held-out accuracy, {target} {unit} (greedy)")
    summary = dict(study=cfg.name, positions=cfg.positions, digit_order=cfg.digit_order, trace=cfg.trace,
                   index_hints=cfg.index_hints, pad_places=cfg.pad_places, position_gaps=cfg.position_gaps,
                   prompt_gaps=cfg.prompt_gaps, gapped_rows=cfg.gapped_rows, rl_reward=cfg.rl_reward,
                   rl_replay_steps=cfg.rl_replay_steps, family=cfg.family, heldout_problems=n,
                   table=table, headline=headline)
    path = R.write(r, summary, "\n".join(lines) + "\n")
    print0("\n".join(lines))
    print0(f"study {cfg.name}: {path}")
    return summary


def register(sub) -> None:
    p = sub.add_parser("beyond_the_data", help="SFT on short additions, GRPO on longer ones without traces: length "
                                               "generalisation against SFT alone at equal FLOPs",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, Config)
    p.set_defaults(func=lambda args: run(config_from_args(args, Config)) and 0)
