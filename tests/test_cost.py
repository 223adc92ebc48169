"""`sputnik cost` against DeepSeek-V3's reported GPU-hours; config import; hardware tables and meters."""
import argparse
import json
import os
import sys
import types

import pytest

from sputnik.accounting import cost
from sputnik.accounting import hardware
from sputnik.config import build, save_config
from sputnik.model.accounting import param_counts
from sputnik.model.config import tiny, v3_671b

V3_PLAN = dict(model="v3-671b", tokens=14.8e12, device="h800", count=2048, seq_len=4096, precision="v3")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sputnik")
    cost.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------
def test_v3_plan_lands_near_reported_gpu_hours():
    r = cost.plan(build(cost.PlanConfig, V3_PLAN))
    assert r["mfu"] == 0.35 and r["mfu_source"] == "DeepSeek-V3 derived 0.35" and r["peak_flops"] == 989e12
    # 6·N·D with N = 36.63B active non-embedding params (head included)
    assert r["flops"]["six_n_d"] == pytest.approx(6 * 36.6256e9 * 14.8e12, rel=1e-4)
    assert r["flops"]["total"] == pytest.approx(r["flops"]["matmul"] + r["flops"]["attention"])
    assert r["flops"]["total"] / r["flops"]["six_n_d"] == pytest.approx(1.186, abs=1e-3)  # attention + MTP
    assert abs(r["device_hours"] / 2.788e6 - 1) < 0.25  # whole final run (V3 Table 1)
    assert abs(r["device_hours"] / 2.664e6 - 1) < 0.25  # pre-training alone
    assert r["device_hours"] == pytest.approx(r["flops"]["total"] / (989e12 * 0.35) / 3600)
    assert r["wall_days"] == pytest.approx(r["device_hours"] / 2048 / 24)
    assert r["money_usd"] == r["money_usd_at_2"] == pytest.approx(2 * r["device_hours"])  # h800 table price is $2
    assert r["energy_j"] == pytest.approx(700 * 3600 * r["device_hours"])
    m, n = r["memory"], param_counts(v3_671b())["total_with_mtp"]
    assert (m["weights"], m["optimizer"], m["sharded_over"]) == (4 * n / 2048, 4 * n / 2048, 2048)
    assert m["activations_rough"] == 34 * 7168 * 4096 * 1 * 62


def test_cost_cli_prints_both_money_figures(capsys):
    argv = ["cost", "v3-671b", "--tokens", "14.8e12", "--device", "h800", "--count", "2048", "--mfu", "0.35",
            "--seq-len", "4096", "--precision", "v3"]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    r = cost.plan(build(cost.PlanConfig, V3_PLAN))
    assert "$5.576M" in text and f"${r['money_usd_at_2'] / 1e6:,.3f}M" in text and "6·N·D alone" in text
    assert cli(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device_hours"] == pytest.approx(r["device_hours"]) and out["mfu_source"] == "given"


def test_prices_file_overrides_table_price_not_the_two_dollar_figure(tmp_path, capsys):
    (tmp_path / "p.toml").write_text("[price_usd_per_hour]\nh800 = 3.0\n[peak_flops]\nmy_gpu = 100e12\n")
    r = cost.plan(build(cost.PlanConfig, {**V3_PLAN, "prices": str(tmp_path / "p.toml")}))
    assert r["money_usd"] == pytest.approx(3 * r["device_hours"]) and r["money_usd_at_2"] == pytest.approx(2 * r["device_hours"])
    mine = cost.plan(build(cost.PlanConfig, {"model": "tiny", "device": "my_gpu", "prices": str(tmp_path / "p.toml")}))
    assert mine["peak_flops"] == 100e12 and mine["price_usd_per_hour"] == 2.0  # unknown kind: generic GPU price


def test_cpu_plan_memory_in_fp32(capsys):
    cfg = build(cost.PlanConfig, dict(model="tiny", tokens=1e8, device="cpu", count=2, seq_len=256, micro_batch=8))
    r = cost.plan(cfg)
    n = param_counts(tiny())["total_with_mtp"]
    assert r["mfu"] == 0.45 and r["price_usd_per_hour"] == 0.02 and r["power_w"] == 10.0
    assert r["device_hours"] == pytest.approx(r["flops"]["total"] / (90e9 * 0.45) / 3600)
    m = r["memory"]  # cores share one memory: no division by count
    assert (m["weights"], m["grads"], m["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert m["activations_rough"] == 34 * 256 * 256 * 8 * 5 * 2  # 4 layers + 1 MTP, fp32 on CPU
    no_mtp = cost.plan(build(cost.PlanConfig, dict(model="tiny", tokens=1e8, device="cpu", mtp=False)))
    assert no_mtp["memory"]["weights"] == 4 * param_counts(tiny())["total"]
    assert cli(["cost", "tiny", "--tokens", "1e8", "--device", "cpu", "--count", "2", "--no-mtp"]) == 0
    assert "no MTP" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
V3_HF = {  # the hub config.json of DeepSeek-V3 (fields that matter; reference §2.6 and §8.1)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40}, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
}
QWEN2_05B = {  # Qwen2.5-0.5B config.json (dense, GQA 14/2, tied embeddings)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "tie_word_embeddings": True, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
}


def test_model_configs_from_hf_json_and_our_json(tmp_path):
    (tmp_path / "v3.json").write_text(json.dumps(V3_HF))
    cfg, source = cost.load_model_config(str(tmp_path / "v3.json"))
    assert param_counts(cfg)["total"] == param_counts(v3_671b())["total"] and "deepseek_v3" in source
    (tmp_path / "qwen.json").write_text(json.dumps(QWEN2_05B))
    p = param_counts(cost.load_model_config(str(tmp_path / "qwen.json"))[0])
    # emb 151936·896 + 24·(attn 2·896² + k, v 2·896·128 + q/k/v biases 896 + 2·128 + mlp 3·896·4864 + norms
    # 2·896) + final norm 896 = transformers' num_parameters() for Qwen2.5-0.5B (the model card's 0.49B)
    assert p["total"] == 151936 * 896 + 24 * (2 * 896**2 + 2 * 896 * 128 + 1152 + 3 * 896 * 4864 + 2 * 896) + 896 \
        == 494_032_768
    # a head dim that is not hidden/heads (Qwen3's) is represented, not refused
    qwen3 = {**QWEN2_05B, "model_type": "qwen3", "head_dim": 128, "attention_bias": False}
    (tmp_path / "qwen3.json").write_text(json.dumps(qwen3))
    c3 = cost.load_model_config(str(tmp_path / "qwen3.json"))[0]
    assert c3.attention_head_dim == 128 and c3.qk_norm and param_counts(c3)["per_layer"]["attention"] == \
        2 * 896 * 14 * 128 + 2 * 896 * 2 * 128 + 2 * 128
    save_config(tiny(hidden_size=128), tmp_path / "ours.json")
    assert cost.load_model_config(str(tmp_path / "ours.json"))[0] == tiny(hidden_size=128)
    (tmp_path / "stage.json").write_text(json.dumps({"config_class": "Stage", "steps": 3, "model": {"hidden_size": 64}}))
    assert cost.load_model_config(str(tmp_path / "stage.json"))[0].hidden_size == 64
    assert cost.load_model_config("V3_671B")[0] == v3_671b()


@pytest.mark.parametrize("content, message", [
    ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, "unknown architecture: model_type='mamba'"),
    ({**QWEN2_05B, "num_key_value_heads": 3}, "num_attention_heads=14 must be divisible by num_key_value_heads=3"),
    ({**V3_HF, "n_group": 7}, "n_routed_experts=256 must be divisible by n_group=7"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_model_configs_fail_clearly(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cost.load_model_config(str(path))


def test_lora_plan_counts_adapters_frozen_base_and_four_n_flops(tmp_path):
    (tmp_path / "qwen.json").write_text(json.dumps(QWEN2_05B))
    base = dict(model=str(tmp_path / "qwen.json"), device="cpu", tokens=1e6, seq_len=512)
    full = cost.plan(build(cost.PlanConfig, base))
    lora = cost.plan(build(cost.PlanConfig, {**base, "lora_rank": 16}))
    # r·(in + out) over q, k, v, o, gate, up, down of 24 layers (D 896, H·C 896, K·C 128, I 4864)
    per_layer = (896 + 896) + 2 * (896 + 128) + (896 + 896) + 2 * (896 + 4864) + (4864 + 896)
    assert lora["params"]["lora"] == 16 * per_layer * 24 == 8_798_208  # = peft's trainable count for this config
    n = full["params"]["total"]
    m = lora["memory"]
    assert m["weights"] == 4 * n + 4 * 8_798_208 and m["grads"] == 4 * 8_798_208 and m["optimizer"] == 8 * 8_798_208
    assert m["activations_rough"] == full["memory"]["activations_rough"]
    assert m["total"] == m["weights"] + m["grads"] + m["optimizer"] + m["activations_rough"] < 0.35 * full["memory"]["total"]
    assert lora["flops"]["matmul"] == pytest.approx(full["flops"]["matmul"] * 4 / 6 + 6 * 8_798_208 * 1e6)
    with pytest.raises(ValueError, match="dense families"):
        cost.plan(build(cost.PlanConfig, {"model": "tiny", "lora_rank": 8}))


def test_bad_planner_inputs():
    with pytest.raises(ValueError, match="neither a preset"):
        cost.load_model_config("huge")
    with pytest.raises(ValueError, match="device='tpu'"):
        cost.plan(build(cost.PlanConfig, {"device": "tpu"}))
    with pytest.raises(ValueError, match="mfu=1.5"):
        build(cost.PlanConfig, {"mfu": 1.5})


# ---------------------------------------------------------------------------------------------
# hardware: tables, detection, energy meters
def test_tables_and_device_keys(tmp_path):
    t = hardware.load_tables()
    assert (t["price_usd_per_hour"]["h800"], t["power_w"]["h100"], t["peak_flops"]["h800"]) == (2.0, 700.0, 989e12)
    assert hardware.device_key("cuda", "NVIDIA H100 80GB HBM3") == "h100"
    assert hardware.device_key("cuda", "NVIDIA H100 PCIe") == "h100_pcie"
    assert hardware.device_key("cuda", "NVIDIA GeForce RTX 4090") == "rtx4090"
    assert hardware.device_key("cuda", "Tesla T4") == "gpu" and hardware.device_key("cpu", "AMD EPYC") == "cpu"
    (tmp_path / "bad.json").write_text('{"prices": {"h100": 1}}')
    with pytest.raises(ValueError, match="unknown table 'prices'"):
        hardware.load_tables(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text('{"power_w": {"h100": -1}}')
    with pytest.raises(ValueError, match=r"power_w.h100=-1: expected a number >= 0"):
        hardware.load_tables(tmp_path / "neg.json")


def test_detect_reads_cpu_model_and_affinity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = hardware.detect()
    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    assert info["cpu_model"] == (model or info["cpu_model"]) and info["cpu_model"]
    assert info["cpu_cores"] == len(os.sched_getaffinity(0))
    if info["device_type"] == "cpu":
        assert (info["count"], info["device_key"]) == (len(os.sched_getaffinity(0)), "cpu")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_table_meter(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(hardware.time, "monotonic", clock)
    info = {"device_type": "cpu", "device_key": "cpu", "count": 2}
    with hardware.EnergyMeter(info, prefer="table", utilisation=0.5) as m:
        clock.t += 5.0
    assert (m.method, m.joules) == ("table", 10.0 * 2 * 5.0 * 0.5)


def _zone(root, name, energy, max_range):
    z = root / name
    z.mkdir()
    (z / "energy_uj").write_text(str(energy))
    (z / "max_energy_range_uj").write_text(str(max_range))
    return z


def test_rapl_meter_handles_wraparound_and_unreadable_files(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "RAPL_ROOT", str(tmp_path))
    pkg = _zone(tmp_path, "intel-rapl:0", 999_000_000, 1_000_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 5, 1_000_000_000)  # a subzone, inside the package: not added again
    info = {"device_type": "cpu", "device_key": "cpu", "count": os.cpu_count()}
    with hardware.EnergyMeter(info) as m:
        (pkg / "energy_uj").write_text("2000000")  # wrapped: 1 J to the top, then 2 J
    assert m.method == "rapl" and m.joules == pytest.approx(3.0)
    half = {**info, "count": os.cpu_count() / 2}
    with hardware.EnergyMeter(half) as m:  # a job on half the cores is charged half the package
        (pkg / "energy_uj").write_text("6000000")
    assert m.joules == pytest.approx(2.0)
    (pkg / "energy_uj").unlink()
    (pkg / "energy_uj").mkdir()  # unreadable (as for non-root since 2020): the table takes over
    with hardware.EnergyMeter(info) as m:
        pass
    assert m.method == "table"


def test_nvml_meter_scales_to_devices_it_cannot_see(monkeypatch):
    counters = {0: 1_000_000, 1: 5_000_000}  # mJ since driver load
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 2,
                                 nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetTotalEnergyConsumption=lambda h: counters[h])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    info = {"device_type": "cuda", "device_key": "h100", "count": 4}  # 2 nodes x 2 GPUs, we see ours
    with hardware.EnergyMeter(info) as m:
        counters[0] += 3_000
        counters[1] += 1_000
    assert m.method == "nvml" and m.joules == pytest.approx((3.0 + 1.0) * 4 / 2)
