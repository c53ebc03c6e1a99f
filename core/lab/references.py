"""Reference curves for "expected vs yours": what a run of the same stage, preset and recipe did on
this project's machine, drawn behind a learner's curve and used by the health checks
(`core.gpt.health`). Each was measured here with the command in its "command", its numbers copied
from the run's metrics.jsonl (`reference_from_metrics`).

CPU fp32 training is deterministic for a seed, so a step budget's curve against steps is the
machine's only through its speed (`seconds`); under a minutes budget the cosine follows the clock,
so another machine's curve differs a little (the band allows for it).
"""

from __future__ import annotations

from core.gpt import health

BUDGET_KEYS = ("max_steps", "max_minutes", "max_tokens")  # how long: any budget draws the same curve
RECIPE_KEYS = ("batch_size", "lr", "min_lr", "warmup_steps")  # what must match for a reference to apply

REFERENCES: dict[str, dict] = {
    "tiny": {
        "stage": "pretrain", "match": {"preset": "tiny", "data": "tinyshakespeare", "tokenizer": "char"},
        "band": 0.1, "command": "python -m core pretrain --data tinyshakespeare --preset tiny --eval-every 25",
        "recipe": {"max_steps": 300, "batch_size": 32, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
        "machine": "this project's 2-core x86 CPU, torch 2.13 fp32, shared by ~9 sessions (load ~15): "
                   "1,722 s for what takes ~30 s on a quiet machine (2026-12-01, --eval-every 25)",
        "step": [1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100, 110, 120, 125, 130, 140, 150, 160, 170, 175,
                 180, 190, 200, 210, 220, 225, 230, 240, 250, 260, 270, 275, 280, 290, 300],
        "train_loss": [4.2224, 3.9311, 3.419, 3.0549, 2.8925, 2.7655, 2.6568, 2.6032, 2.5526, 2.5516, 2.5339,
                       2.5347, 2.5136, 2.4944, 2.4789, 2.4659, 2.484, 2.461, 2.457, 2.4395, 2.4228, 2.4436, 2.4135,
                       2.4035, 2.4232, 2.3902, 2.3787, 2.3693, 2.3821, 2.3636, 2.3738, 2.354, 2.3485, 2.3602,
                       2.3362, 2.3555, 2.3559],
        "val_loss": [None, None, None, 2.9586, None, None, 2.623, None, None, 2.5368, None, None, 2.4956, None,
                     None, 2.4636, None, None, 2.4405, None, None, 2.4181, None, None, 2.3996, None, None, 2.3795,
                     None, None, 2.3707, None, None, 2.354, None, None, 2.3491],
    },
    "small": {
        "stage": "pretrain", "band": 0.1,
        "match": {"preset": 'small', "data": 'tinyshakespeare', "tokenizer": 'char'},
        "command": "python -m core pretrain --data tinyshakespeare --preset small --eval-every 25",
        "recipe": {"max_steps": 500, "batch_size": 32, "lr": 0.005, "min_lr": 0.0005, "warmup_steps": 30},
        "machine": "this project's 2-core x86 CPU, torch 2.13 fp32, shared with other sessions (load ~2): 97.8 s "
                   "for 500 steps (2026-12-02, --eval-every 25)",
        "step": [1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100, 110, 120, 125, 130, 140, 150, 160, 170, 175,
                 180, 190, 200, 210, 220, 225, 230, 240, 250, 260, 270, 275, 280, 290, 300, 310, 320, 325, 330, 340,
                 350, 360, 370, 375, 380, 390, 400, 410, 420, 425, 430, 440, 450, 460, 470, 475, 480, 490, 500],
        "train_loss": [4.2242, 3.4632, 2.8453, 2.6594, 2.601, 2.582, 2.5426, 2.5192, 2.4884, 2.48, 2.4727, 2.462,
                       2.4322, 2.3738, 2.3303, 2.2976, 2.2841, 2.2651, 2.2339, 2.1967, 2.1637, 2.1734, 2.129,
                       2.0976, 2.1131, 2.0494, 2.029, 1.9907, 2.0099, 1.9778, 1.9864, 1.9578, 1.922, 1.9476, 1.8964,
                       1.8986, 1.8885, 1.8486, 1.8624, 1.8344, 1.8329, 1.8247, 1.7935, 1.8019, 1.7917, 1.8033,
                       1.7305, 1.7619, 1.7501, 1.7582, 1.742, 1.7343, 1.7424, 1.7334, 1.7219, 1.7197, 1.7304,
                       1.7113, 1.6868, 1.7069, 1.6697],
        "val_loss": [None, None, None, 2.6468, None, None, 2.5204, None, None, 2.4767, None, None, 2.4144, None,
                     None, 2.2918, None, None, 2.2284, None, None, 2.1669, None, None, 2.1132, None, None, 2.0719,
                     None, None, 2.04, None, None, 1.9936, None, None, 1.9579, None, None, 1.9419, None, None,
                     1.9322, None, None, 1.9022, None, None, 1.8792, None, None, 1.86, None, None, 1.8531, None,
                     None, 1.8342, None, None, 1.8204],
    },
    "base": {
        "stage": "pretrain", "band": 0.1,
        "match": {"preset": 'base', "data": 'tinyshakespeare', "tokenizer": 'bpe:1000'},
        "command": "python -m core pretrain --data tinyshakespeare --preset base",
        "recipe": {"max_minutes": 5.0, "batch_size": 16, "lr": 0.003, "min_lr": 0.0003, "warmup_steps": 50},
        "machine": "this project's 2-core x86 CPU, torch 2.13 fp32, shared with other sessions (load ~2) and this"
                   " session's tests: 612 steps in the 5 minutes (a quiet machine gets ~1,700, and the cosine "
                   "follows the clock) (2026-12-02)",
        "step": [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200, 210,
                 220, 230, 240, 250, 260, 270, 280, 290, 300, 310, 320, 330, 340, 350, 360, 370, 380, 390, 400, 410,
                 420, 430, 440, 450, 460, 470, 480, 490, 500, 510, 520, 530, 540, 550, 560, 570, 580, 590, 600, 610,
                 612],
        "train_loss": [6.9326, 6.5817, 6.0256, 5.641, 5.4175, 5.228, 4.9658, 4.8608, 4.798, 4.7455, 4.6162, 4.6135,
                       4.5799, 4.4706, 4.4149, 4.4071, 4.3679, 4.2851, 4.2769, 4.1978, 4.2293, 4.1683, 4.1407,
                       4.1576, 4.0982, 4.0274, 4.0359, 4.068, 4.0092, 4.0208, 3.9627, 3.9859, 3.8948, 3.9406,
                       3.9089, 3.915, 3.9118, 3.9184, 3.8767, 3.853, 3.8294, 3.8497, 3.8145, 3.8627, 3.8016, 3.8127,
                       3.7697, 3.7807, 3.7943, 3.7085, 3.7288, 3.72, 3.8295, 3.7719, 3.7078, 3.7374, 3.7606, 3.7294,
                       3.7315, 3.7193, 3.6704, 3.6904, 3.7199],
        "val_loss": [None, None, None, None, None, None, None, None, None, None, 4.6549, None, None, None, None,
                     None, None, None, None, None, 4.32, None, None, None, None, None, None, None, None, None,
                     4.183, None, None, None, None, None, None, None, None, None, 4.0913, None, None, None, None,
                     None, None, None, None, None, 4.0225, None, None, None, None, None, None, None, None, None,
                     3.9796, None, 3.9781],
    },
    "classify-base": {
        "stage": "classify", "band": 0.5,
        "match": {"model.vocab_size": 1000, "model.context_length": 256, "model.n_embd": 128, "model.n_head": 4,
                  "model.n_layer": 4, "model.position": 'learned', "model.norm": 'layernorm', "classifier.freeze":
                  'all', "classifier.data": 'sms-spam', "classifier.random_init": False},
        "command": "python -m core classify --from <a 5-minute base run> --data sms-spam",
        "recipe": {"max_steps": 300, "batch_size": 16, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 20},
        "machine": "this project's 2-core x86 CPU, torch 2.13 fp32, shared with other sessions (load ~2): 300 "
                   "steps in 110 s from the 5-minute base run above; 97.0 % test accuracy, weights of step 200 "
                   "kept (2026-12-02)",
        "step": [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100, 105, 110, 115,
                 120, 125, 130, 135, 140, 145, 150, 155, 160, 165, 170, 175, 180, 185, 190, 195, 200, 205, 210, 215,
                 220, 225, 230, 235, 240, 245, 250, 255, 260, 265, 270, 275, 280, 285, 290, 295, 300],
        "train_loss": [0.8344, 0.8089, 0.5467, 0.4572, 0.1724, 0.0511, 0.5026, 0.4466, 0.3173, 0.1815, 0.1689,
                       0.222, 0.2793, 0.1391, 0.1555, 0.1099, 0.1604, 0.0238, 0.1911, 0.056, 0.1461, 0.1832, 0.138,
                       0.1137, 0.1167, 0.0781, 0.1387, 0.1016, 0.0108, 0.0195, 0.1625, 0.083, 0.087, 0.1352, 0.012,
                       0.0885, 0.0723, 0.0033, 0.0697, 0.0644, 0.0083, 0.0025, 0.0105, 0.0192, 0.0175, 0.0153,
                       0.0054, 0.0007, 0.0327, 0.0379, 0.0006, 0.0016, 0.0008, 0.0011, 0.0023, 0.0005, 0.0003,
                       0.0003, 0.0018, 0.0003, 0.0002],
        "val_loss": [None, None, None, None, None, None, None, None, 0.191, None, None, None, None, None, None,
                     None, 0.0474, None, None, None, None, None, None, None, 0.0439, None, None, None, None, None,
                     None, None, 0.0489, None, None, None, None, None, None, None, 0.0231, None, None, None, None,
                     None, None, None, 0.0908, None, None, None, None, None, None, None, 0.0753, None, None, None,
                     0.0759],
    },
    "instruct-base": {
        "stage": "instruct", "band": 0.1,
        "match": {"model.vocab_size": 1000, "model.context_length": 256, "model.n_embd": 128, "model.n_head": 4,
                  "model.n_layer": 4, "model.position": 'learned', "model.norm": 'layernorm', "instruct.data":
                  'instruction-data', "instruct.mask_prompt": False, "lora": None},
        "command": "python -m core instruct --from <a 5-minute base run>",
        "recipe": {"max_steps": 200, "batch_size": 8, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 20},
        "machine": "this project's 2-core x86 CPU, torch 2.13 fp32, shared with other sessions (load ~2): 200 "
                   "steps in 78 s from the 5-minute base run above; format-following 0 % -> 100 % (2026-12-02)",
        "step": [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95, 100, 105, 110, 115,
                 120, 125, 130, 135, 140, 145, 150, 155, 160, 165, 170, 175, 180, 185, 190, 195, 200],
        "train_loss": [5.689, 5.4557, 4.3631, 3.3189, 2.6712, 2.3184, 1.9248, 2.0238, 1.6977, 1.7769, 1.6142,
                       1.6753, 1.7198, 1.6103, 1.5191, 1.758, 1.5531, 1.4752, 1.6935, 1.4856, 1.5079, 1.4678,
                       1.4913, 1.3818, 1.4865, 1.3343, 1.4138, 1.3764, 1.5015, 1.3575, 1.3532, 1.4367, 1.2574,
                       1.2374, 1.3695, 1.3084, 1.3388, 1.2644, 1.2644, 1.3336, 1.2896],
        "val_loss": [None, None, None, None, None, None, None, None, None, None, 1.68, None, None, None, None, None,
                     None, None, None, None, 1.4693, None, None, None, None, None, None, None, None, None, 1.3899,
                     None, None, None, None, None, None, None, None, None, 1.3575],
    },
}


def _value(config: dict, path: str):
    """config["a"]["b"] for the path "a.b" (None when any part is missing)."""
    for part in path.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def reference_for(run_config: dict, stage: str = "pretrain") -> dict | None:
    """The reference curve of a run's stage, preset (or model shape) and recipe, if one was measured."""
    train = run_config.get("train") or {}
    for ref in REFERENCES.values():
        if ref["stage"] != stage or any(_value(run_config, k) != v for k, v in ref["match"].items()):
            continue
        if all(train.get(k) == v for k, v in ref["recipe"].items() if k not in BUDGET_KEYS):
            return ref
    return None


def reference_from_metrics(metrics: list[dict], every: int = 1) -> dict:
    """The curve part of a reference (step, train_loss, val_loss) from a run's metrics rows: every
    `every`-th training point, and every validation point."""
    rows = [m for i, m in enumerate(r for r in metrics if "train_loss" in r or "val_loss" in r)
            if m.get("val_loss") is not None or i % every == 0]
    return {"step": [m["step"] for m in rows],
            "train_loss": [round(m["train_loss"], 4) if m.get("train_loss") is not None else None for m in rows],
            "val_loss": [round(m["val_loss"], 4) if m.get("val_loss") is not None else None for m in rows]}


def band(reference: dict | None):
    """(steps, low, high) of the reference validation loss ± its band, for a chart (None: no reference)."""
    if not reference:
        return None
    points = [(s, v) for s, v in zip(reference["step"], reference["val_loss"]) if v is not None]
    b = reference.get("band", 0.1)
    return [s for s, _ in points], [v * (1 - b) for _, v in points], [v * (1 + b) for _, v in points]


def expected_vs_yours(run_config: dict, metrics: list[dict], stage: str) -> dict:
    """What pages 4-6 draw and say beside a run's curve: the reference of its stage and recipe (or
    None), its band, and the health checks' sentences."""
    reference = reference_for(run_config, stage)
    return {"reference": reference, "band": band(reference),
            "health": [m.text for m in health.health_messages(metrics, reference, fine_tuning=stage != "pretrain")]}
