"""`sputnik eval`: accuracy of a model on a task, with the statistics reasoning papers report.

pass@1 (mean correctness over all samples), unbiased pass@k (Chen et al. 2021), maj@k
(self-consistency: majority vote over the k extracted answers), format-compliance rate, mean
response length and generated tokens/s, each with a 95% interval (Wilson for proportions over
problems, percentile bootstrap otherwise). The sampling settings and seed are recorded with the
results. Works on sputnik model directories and any local Hugging Face causal LM; the task is a task
spec: built-in, `rg:<dataset>`, `jsonl:path=FILE`, or the real benchmarks `gsm8k:path=FILE` /
`svamp:path=FILE`.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from sputnik.common import atomic_write_json, atomic_write_text, print0, seed_everything
from sputnik.config import DeviceConfig, add_config_args, config_from_args, knob, save_config
from sputnik.inference.engine import Engine
from sputnik.inference.sampling import SamplingParams
from sputnik.metrics import bootstrap_interval, majority_vote, pass_at_k, task_tally, wilson_interval


@dataclass
class EvalConfig(DeviceConfig):
    model: str = knob("", "model directory (sputnik stage output <out>/model, or a local HF causal LM)")
    task: str = knob("addition", "task spec name[:knob=value...] or a one-task @preset: built-in (sputnik tasks list), rg:<dataset>, "
                                 "jsonl:path=F, gsm8k:path=F or svamp:path=F")
    split: str = knob("test", "split to evaluate", choices=("train", "test"))
    num_problems: int = knob(200, "problems (file tasks: the first N; 0 = all)", min=0)
    samples: int = knob(1, "samples per problem (k for pass@k / maj@k)", min=1)
    temperature: float = knob(0.0, "0 = greedy (samples must be 1), else sampling temperature", min=0.0)
    top_p: float = knob(1.0, "nucleus sampling", min=0.01, max=1.0)
    top_k: int = knob(0, "top-k sampling (0 = off)", min=0)
    max_new_tokens: int = knob(256, "generation budget per sample", min=1)
    prompt_template: str = knob("{prompt}", "how a problem becomes the user turn ({prompt} is replaced)")
    batch_size: int = knob(64, "rows decoded together", min=1)
    out: str = knob("", "output directory for results.json and results.md ('' = <model>/eval/<task>)")
    project_dir: str = knob("", "directory of the cost ledger to record this evaluation in ('' = none)")
    tokenizer: str = knob("", "tokenizer directory or tokenizer.json ('' = the one saved with the model)")
    seed: int = knob(0, "sampling seed", min=0)

    def __post_init__(self):
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(f"samples={self.samples} with temperature=0: greedy samples are identical; "
                             "set --temperature > 0 for pass@k / maj@k")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r}: must contain {{prompt}}")
        from sputnik.tasks import one_task_spec

        self.task = one_task_spec(self.task)  # results record the spec a preset stands for


def greedy_eval(engine, tokenizer, tasks, n: int, seed: int, max_new_tokens: int, render=None,
                shard: tuple[int, int] = (0, 1)) -> dict:
    """Greedy decoding on tasks.heldout_examples(tasks, n, seed), the problems SFT evaluates on too, so
    the stages' accuracies compare -> {"accuracy": exact match, "tokens_per_s", "tally":
    metrics.task_tally over the tasks' names (sum it over ranks, then metrics.by_task)}. `render(prompt)
    -> ids` defaults to the chat prompt; RL's R1-Zero recipe passes its template. shard (i, k): only
    problems i, i + k, ... (rank i of k; accuracy over those, 0.0 when there are none)."""
    from sputnik.tasks import heldout_examples

    render = render or tokenizer.render_prompt
    names = [t.name for t in tasks]
    exs = heldout_examples(tasks, n, seed)[shard[0]::shard[1]]
    if not exs:
        return {"accuracy": 0.0, "tokens_per_s": 0.0, "tally": task_tally(names, [], [])}
    by_name = {t.name: t for t in tasks}
    outs = engine.generate([render(ex.prompt) for ex in exs], SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=tokenizer.stop_ids))
    correct = [by_name[ex.task].verify(ex, o[0].text).correct for ex, o in zip(exs, outs)]
    return {"accuracy": sum(correct) / len(exs), "tokens_per_s": engine.last_stats.tokens_per_second,
            "tally": task_tally(names, [ex.task for ex in exs], correct)}


def score(examples, completions, verify, k: int) -> dict:
    """Per-problem statistics -> the summary dict (pure: tested on hand-made verdicts)."""
    n_prob = len(examples)
    correct = [[verify(ex, c.text) for c in comps] for ex, comps in zip(examples, completions)]
    c_counts = [sum(v.correct for v in vs) for vs in correct]
    pass1 = [c / k for c in c_counts]
    out = {"problems": n_prob, "samples_per_problem": k}
    out["pass@1"] = sum(pass1) / n_prob
    out["pass@1_ci"] = wilson_interval(sum(pass1), n_prob) if k == 1 else bootstrap_interval(pass1)
    if k > 1:
        pk = [pass_at_k(k, c, k) for c in c_counts]
        out[f"pass@{k}"] = sum(pk) / n_prob
        out[f"pass@{k}_ci"] = wilson_interval(sum(pk), n_prob)
        maj = []
        for ex, vs in zip(examples, correct):
            winner = majority_vote([v.extracted for v in vs])
            maj.append(any(v.correct and v.extracted == winner for v in vs) if winner is not None else False)
        out[f"maj@{k}"] = sum(maj) / n_prob
        out[f"maj@{k}_ci"] = wilson_interval(sum(maj), n_prob)
    # strict: right AND in the exact <think>..</think><answer>..</answer> format; pass@1 above is
    # lenient (any answer the task's parser accepts: untagged last number, 1,000, \frac{1}{2}, ...)
    strict = [sum(v.correct and v.well_formatted for v in vs) / k for vs in correct]
    out["pass@1_strict"] = sum(strict) / n_prob
    out["pass@1_strict_ci"] = wilson_interval(sum(strict), n_prob) if k == 1 else bootstrap_interval(strict)
    fmt = [sum(v.well_formatted for v in vs) / k for vs in correct]
    out["format_rate"] = sum(fmt) / n_prob
    out["format_rate_ci"] = bootstrap_interval(fmt)
    lengths = [len(c.token_ids) for comps in completions for c in comps]
    out["mean_length"] = sum(lengths) / len(lengths)
    out["mean_length_ci"] = bootstrap_interval([float(x) for x in lengths])
    out["truncated_rate"] = sum(c.finish_reason == "length" for comps in completions for c in comps) / len(lengths)
    return out, correct


def markdown(res: dict) -> str:
    rows = [("pass@1 (lenient parsing)", "pass@1"), ("pass@1 (strict: exact format)", "pass@1_strict")]
    rows += [(k, k) for k in res if (k.startswith("pass@") or k.startswith("maj@"))
             and not k.endswith("_ci") and k not in ("pass@1", "pass@1_strict")]
    rows += [("format compliance", "format_rate"), ("mean length (tokens)", "mean_length")]
    lines = [f"## {res['task']} — {res['model']}", "", "| metric | value | 95% interval |", "|---|---|---|"]
    for label, key in rows:
        lo, hi = res.get(key + "_ci", (None, None))
        lines.append(f"| {label} | {res[key]:.4g} | {'' if lo is None else f'[{lo:.4g}, {hi:.4g}]'} |")
    lines.append(f"| tokens/s (generation) | {res['tokens_per_s']:.1f} | |")
    lines += ["", f"{res['problems']} problems × {res['samples_per_problem']} samples; sampling: "
                  f"{json.dumps(res['sampling'])}"]
    return "\n".join(lines) + "\n"


def run(cfg: EvalConfig) -> dict:
    from sputnik.tasks import parse_task
    from sputnik.train.session import process

    if not cfg.model:
        raise ValueError("model: give a model directory")
    with process(cfg) as (choice, _):
        return _run(cfg, parse_task(cfg.task), choice)


def _run(cfg: EvalConfig, task, choice) -> dict:
    from sputnik.train.loading import load_model, load_tokenizer

    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    model = load_model(cfg.model).to(choice.device).eval()
    if cfg.num_problems == 0 and task.name not in ("gsm8k", "svamp", "jsonl"):
        raise ValueError("num_problems=0 (all) only applies to file tasks; procedural tasks are endless")
    with warnings.catch_warnings():  # "asked for more than the file has" is the point of num_problems=0
        warnings.simplefilter("ignore")
        examples = task.generate(cfg.num_problems or 10**6, split=cfg.split, seed=cfg.seed)
    if not examples:
        raise ValueError(f"task {cfg.task} has no {cfg.split} problems")
    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size * cfg.samples, compile=cfg.compile,
                    cuda_graphs=cfg.cuda_graphs)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, stop_token_ids=tokenizer.stop_ids, seed=cfg.seed)
    t0 = time.perf_counter()
    prompts = [tokenizer.render_prompt(cfg.prompt_template.format(prompt=ex.prompt)) for ex in examples]
    completions = engine.generate(prompts, params, num_samples=cfg.samples)
    gen_s = time.perf_counter() - t0
    res, verdicts = score(examples, completions, task.verify, cfg.samples)
    res.update(task=cfg.task, split=cfg.split, model=str(cfg.model), seed=cfg.seed,
               sampling=asdict(params) | {"samples": cfg.samples, "prompt_template": cfg.prompt_template},
               tokens_per_s=sum(len(c.token_ids) for cs in completions for c in cs) / max(gen_s, 1e-9),
               generation_seconds=gen_s)
    out = Path(cfg.out) if cfg.out else Path(cfg.model) / "eval" / task.name.replace(":", "_")
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", markdown(res))
    atomic_write_text(out / "samples.jsonl", "".join(
        json.dumps(dict(prompt=ex.prompt, answer=ex.answer, completion=cs[0].text, correct=vs[0].correct,
                        extracted=vs[0].extracted, reason=vs[0].reason)) + "\n"
        for ex, cs, vs in list(zip(examples, completions, verdicts))[:50]))
    save_config(cfg, out / "eval_config.json")
    print0(markdown(res))
    return res


def _run_ledgered(cfg: EvalConfig) -> dict:
    if not cfg.project_dir:
        return run(cfg)
    from sputnik.accounting.ledger import record_run

    with record_run(cfg.project_dir, "eval", cfg) as led:
        res = run(cfg)
        led.metrics.update(heldout_accuracy=res["pass@1"], task=cfg.task)
        return res


def register(sub) -> None:
    p = sub.add_parser("eval", help="pass@1, pass@k, maj@k, format rate, length, tokens/s of a model on a task",
                       description=__doc__.split("\n\n")[0])
    add_config_args(p, EvalConfig)
    p.set_defaults(func=lambda args: _run_ledgered(config_from_args(args, EvalConfig)) and 0)
