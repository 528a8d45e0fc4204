"""What bench/cost.py's measurements say: the ratios of TBCM and the bank to sCM against Tab. 3,
the markdown tables of Fig. 4's stages, the memory-vs-resolution lines of `--sweep`, and the
paper-shape table of `--config paper-sana` (cost_compose.py)."""

import numpy as np

VARIANTS = ("scm", "tbcm", "bank")
# ours (lora.py): the teacher's own module plus a LoRA adapter as the student, online and bank
LORA_VARIANTS, LORA_FLAGS = ("tbcm-lora", "bank-lora"), ["--student", "lora", "--lora-rank", "16"]
# the paper's Tab. 3 (sCM 62.9 GB / 7965 GPU·h, TBCM 22.6 GB / 4640 GPU·h); ours: the bank's target
CLAIMS = (
    ("tbcm_over_scm_time_per_pair", 4640 / 7965, "TBCM/sCM training time (Tab. 3: 0.58)"),
    ("tbcm_over_scm_peak_memory", 22.6 / 62.9, "TBCM/sCM peak memory (Tab. 3: 0.36)"),
    ("bank_over_scm_peak_memory", 0.2, "bank/sCM peak memory (target 0.2)"),
    ("bank_over_tbcm_time_per_pair", 1.0, "bank/TBCM time per pair (target < 1)"),
    ("bank-lora_over_scm_peak_memory", 0.1, "bank-lora/sCM peak memory (target 0.10, ours)"),
)


# the targets under the official recipe (CAME, checkpointing, both sides), and in 15 micro-batches
TARGETS = (("tbcm", "TBCM", 0.30), ("bank", "bank", 0.15), ("bank-lora", "bank-lora", 0.05))
CLAIMED = (("came-ckpt", "CAME + ckpt"), ("came-ckpt-accum15", "CAME + ckpt, 15 micro-batches"))
RECIPE_CLAIMS = tuple(
    (f"{v}-{r}_over_scm-{r}_peak_memory", x, f"{name}/sCM, {label} (target {x:.2f})")
    for r, label in CLAIMED
    for v, name, x in TARGETS
)


def recipe_key(key: str, recipe: str) -> str:
    """tbcm_over_scm_peak_memory → tbcm-<recipe>_over_scm-<recipe>_peak_memory."""
    a, rest = key.split("_over_")
    b, q = rest.split("_", 1)
    return f"{a}-{recipe}_over_{b}-{recipe}_{q}"


TAB3_GB = dict(scm=62.9, tbcm=22.6)  # Tab. 3, one A100, batch 16
RATIO_KEYS = ("tbcm_over_scm_peak_memory", "bank_over_scm_peak_memory")


def ratios_of(v: dict) -> dict:
    """TBCM and the bank against sCM; memory: CUDA's peak on a GPU, else the peak RSS."""
    s, tb, bk, floor = v["scm"], v["tbcm"], v["bank"], "peak_above_floor_mb"
    mem = "cuda_peak_mb" if "cuda_peak_mb" in s else "peak_rss_mb"
    return {
        "tbcm_over_scm_time_per_pair": tb["time_per_pair_s"] / s["time_per_pair_s"],
        "tbcm_over_scm_peak_memory": tb[mem] / s[mem],
        "tbcm_over_scm_peak_above_floor": tb[floor] / s[floor],
        "bank_over_scm_peak_memory": bk[mem] / s[mem],
        "bank_over_scm_peak_above_floor": bk[floor] / s[floor],
        "bank_over_tbcm_time_per_pair": bk["time_per_pair_s"] / tb["time_per_pair_s"],
    } | {
        f"{k}_over_scm_{q}": v[k][key] / s[key]
        for k in LORA_VARIANTS
        if k in v
        for q, key in (("peak_memory", mem), ("time_per_pair", "time_per_pair_s"))
    }


def composed_ratios(s: dict, t: dict, b: dict, lora: dict | None = None) -> dict:
    """The ratio keys from composed (or direct) peaks and times; `lora`: the LoRA variants'."""
    return {
        "tbcm_over_scm_time_per_pair": t["time_per_pair_s"] / s["time_per_pair_s"],
        "tbcm_over_scm_peak_memory": t["peak_mb"] / s["peak_mb"],
        "bank_over_scm_peak_memory": b["peak_mb"] / s["peak_mb"],
        "bank_over_tbcm_time_per_pair": b["time_per_pair_s"] / t["time_per_pair_s"],
    } | {
        f"{k}_over_scm_{q}": v[key] / s[key]
        for k, v in (lora or {}).items()
        if v
        for q, key in (("peak_memory", "peak_mb"), ("time_per_pair", "time_per_pair_s"))
    }


def claim_lines(ratios: dict, claims=CLAIMS) -> list[str]:
    """One line per claim: reproduced when the measured ratio is at or below the target."""
    verdict = {True: "reproduced", False: "not reproduced at this scale"}
    # two decimals, three where two would round across the target
    shown = {
        k: f"{q:.2f}" if (round(q, 2) <= x) == (q <= x) else f"{q:.3f}"
        for k, x, _ in claims
        if (q := ratios.get(k)) is not None
    }
    return [
        f"{t}: measured {shown[k]}, {verdict[ratios[k] <= x]}" for k, x, t in claims if k in shown
    ]


def dyn_mb(stage: dict) -> str:
    return "–" if stage["dynamic_mem_mb"] is None else f"{stage['dynamic_mem_mb']:.0f}"


def table(variants: dict) -> str:
    """Time per pair, step, peak memory, then per stage its seconds per step (dynamic MB)."""
    v = list(variants.values())
    rows = [("time per pair (ms)", [f"{x['time_per_pair_s'] * 1e3:.1f}" for x in v])]
    rows.append(("step (s)", [f"{x['step_s']:.2f}" for x in v]))
    rows.append(("peak RSS (MB)", [f"{x['peak_rss_mb']:.0f}" for x in v]))
    if all("cuda_peak_mb" in x for x in v):
        rows.append(("CUDA peak (MB)", [f"{x['cuda_peak_mb']:.0f}" for x in v]))
    rows.append(("peak above floor (MB)", [f"{x['peak_above_floor_mb']:.0f}" for x in v]))
    for s in v[0]["stages"]:
        cells = [f"{x['stages'][s]['s_per_step']:.3f} ({dyn_mb(x['stages'][s])})" for x in v]
        rows.append((f"{s}: s/step (dyn. MB)", cells))
    head = ["| | " + " | ".join(variants) + " |", "|---" * (len(v) + 1) + "|"]
    return "\n".join(head + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows])


def fit(rows: list[dict]) -> dict:
    """Per variant a least-squares line peak_above_floor = a + b·pixels: b_tbcm/b_scm is the ratio
    that large images approach at this width, a the resolution-independent part (weights, optimiser
    state)."""
    px, fits = np.array([r["resolution"] ** 2 for r in rows], dtype=float), {}
    for v in VARIANTS:
        b, a = np.polyfit(px, [r[v]["peak_above_floor_mb"] for r in rows], 1)
        fits[v] = {"mb_fixed": a, "mb_per_megapixel": b * 1e6}
    b_scm = fits["scm"]["mb_per_megapixel"]
    limits = {
        f"{v}_over_scm_large_images": fits[v]["mb_per_megapixel"] / b_scm for v in VARIANTS[1:]
    }
    return {"fits": fits, "limits": limits}


def sweep_table(res: dict) -> str:
    """Peak memory per resolution and variant, sCM's DC-AE stage, the ratios, the fitted lines."""
    out = [
        "| resolution | sCM peak (MB) | TBCM | bank | sCM VAE-encode dyn. | TBCM/sCM | bank/sCM |"
    ]
    out.append("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        s, t, b = (r[v]["peak_rss_mb"] for v in VARIANTS)
        vae = r["scm"]["dynamic_mem_mb"]["vae_encode"]
        rel = f"{t / s:.2f} | {b / s:.2f}"
        out.append(f"| {r['resolution']} px | {s:.0f} | {t:.0f} | {b:.0f} | {vae:.0f} | {rel} |")
    f = res["fits"]
    lines = [f"{v} {f[v]['mb_fixed']:.0f} MB + {f[v]['mb_per_megapixel']:.0f} MB/Mpx" for v in f]
    limits = ", ".join(f"{k} {x:.2f}" for k, x in res["limits"].items())
    out += ["", "peak above floor ≈ fixed + slope·pixels: " + ", ".join(lines)]
    return "\n".join([*out, "ratios approached by large images at this width: " + limits])


def paper_table(res: dict) -> str:
    """Markdown: per setting the composed peaks (GB above the floor), their ratios, sCM's largest
    stage and the seconds per pair (CPU: the process's CPU seconds); the direct steps beside the
    composition; the claim lines of the headline setting."""
    gb = lambda x: "–" if x is None else f"{x['peak_mb'] / 1024:.1f}"  # noqa: E731
    sp = lambda x: "–" if x is None else f"{x['time_per_pair_s']:.0f}"  # noqa: E731
    names = [
        v for v in (*VARIANTS, *LORA_VARIANTS) if any(r.get(v) for r in res["composed"].values())
    ]
    keys = [*RATIO_KEYS, *(f"{v}_over_scm_peak_memory" for v in names[3:])]
    head = [f"{v.replace('scm', 'sCM').replace('tbcm', 'TBCM')}" for v in names]
    rows = ["| px, sCM DC-AE images/call | " + " | ".join(f"{h} GB" for h in head) + " | "]
    rows[0] += " | ".join(f"{h}/sCM" for h in head[1:]) + " | sCM's largest stage | s/pair "
    rows[0] += " / ".join(head) + " |"
    rows.append("|---" * (2 * len(names) + 2) + "|")
    for k, r in res["composed"].items():
        q = r.get("ratios", {})
        f = [f"{q[x]:.2f}" if x in q else "–" for x in keys]
        neck = r["scm"]["bottleneck"] if r["scm"] else "–"
        times = " / ".join(sp(r.get(v)) for v in names)
        setting = k.replace("px_vae_batch_", " px, ")
        cells = [setting, *(gb(r.get(v)) for v in names), *f, neck, times]
        rows.append("| " + " | ".join(cells) + " |")
    rows += ["", f"Tab. 3 (A100, batch 16): sCM {TAB3_GB['scm']} GB, TBCM {TAB3_GB['tbcm']} GB."]
    rows += ["", "| direct step, 512 px | peak GB | composed GB | composed/direct − 1 | step s |"]
    rows.append("|---" * 5 + "|")
    for d in res["direct"].values():
        c = "–" if d["composed_peak_mb"] is None else f"{d['composed_peak_mb'] / 1024:.2f}"
        rel = "–" if d["rel_diff"] is None else f"{d['rel_diff']:+.3f}"
        label = f"{d['variant']} {d.get('recipe', 'adamw-ckpt')} ({d['pairs']} pairs" + (
            f", DC-AE {d['vae_batch']}/call)" if d["vae_batch"] else ")"
        )
        peak = f"{d['peak_above_floor_mb'] / 1024:.2f}"
        rows.append(f"| {label} | {peak} | {c} | {rel} | {d['step_s']:.0f} |")
    rows += ["", *recipe_table(res), "", *holds_table(res)] if "by_recipe" in res else []
    return "\n".join(rows + [""] + res.get("claims", []))


def recipe_table(res: dict) -> list[str]:
    """Per resolution and recipe (sCM's DC-AE on the whole batch) the peaks and their ratios."""
    names = ("scm", "tbcm", "bank", *LORA_VARIANTS)
    head = [v.replace("scm", "sCM").replace("tbcm", "TBCM") for v in names]
    rows = ["| px, recipe (both sides) | " + " | ".join(f"{h} GB" for h in head) + " | "]
    rows[0] += " | ".join(f"{h}/sCM" for h in head[1:]) + " |"
    rows.append("|---" * (2 * len(names)) + "|")
    for px in (512, 1024):
        for recipe, by in res["by_recipe"].items():
            r, s = by[f"{px}px_vae_batch_16"], by[f"{px}px_vae_batch_16"]["scm"]
            gb = ["–" if r.get(v) is None else f"{r[v]['peak_mb'] / 1024:.1f}" for v in names]
            q = [
                "–" if not (s and r.get(v)) else f"{r[v]['peak_mb'] / s['peak_mb']:.2f}"
                for v in names[1:]
            ]
            rows.append(f"| {px} px, {recipe} | " + " | ".join(gb + q) + " |")
    return rows


def holds_table(res: dict, recipe: str = "came-ckpt", px: int = 1024) -> list[str]:
    """What each variant's composed peak holds under `recipe` at `px` (GB): the networks it keeps,
    the student's optimiser state, and the largest stage, the fp32 gradient within it."""
    row = res["by_recipe"].get(recipe, {}).get(f"{px}px_vae_batch_16", {})
    cols = ("text_encoder", "teacher", "vae", "student")
    out = [f"What the peaks hold, {px} px, {recipe} (GB): the networks kept, the optimiser state,"]
    out[0] += " the largest stage (its gradient, then the rest: activations and temporaries)."
    out += [
        "",
        "| variant | peak | Gemma | teacher | DC-AE | student θ | optimiser | largest stage |",
    ]
    out.append("|---" * 8 + "|")
    for v in ("scm", "tbcm", "bank", *LORA_VARIANTS):
        c = row.get(v)
        if not c:
            continue
        t, top = c["tensor_mb"] or {}, c["bottleneck"]
        gb = [f"{t[k] / 1024:.2f}" if k in t else "–" for k in cols]
        rise = c["stage_mb"][top]
        grads = c["grads_mb"] if top in ("student_fwd_bwd", "optimizer") else 0.0
        stage = f"{top} {rise / 1024:.2f} ({grads / 1024:.2f} + {(rise - grads) / 1024:.2f})"
        state = c["optimizer_state_mb"]
        cells = [f"{c['peak_mb'] / 1024:.2f}", *gb, "–" if state is None else f"{state / 1024:.2f}"]
        cells.append(stage)
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return out


GPU_ROWS = {  # README's GPU recipe: variant → what a user runs
    "tbcm": "TBCM, full student (the `sana` preset)",
    "tbcm-lora": "TBCM, `--student lora` (rank 16, bf16 base)",
    "bank": "from a bank (`--bank`)",
    "bank-lora": "from a bank, `--student lora`",
    "scm": "sCM baseline (DC-AE: 16 images per call)",
}


def gpu_memory(res: dict, recipe: str = "came-ckpt") -> str:
    """Markdown for the README: the composed peak per GPU (GB above the libraries' floor) at 512
    and 1024 px for 1 prompt × 15 pairs under the sana preset's recipe (CAME, checkpointing),
    from the paper-shape JSON (cost_paper-sana.json)."""
    by = res.get("by_recipe", {}).get(recipe) or res["composed"]
    named = {"came-ckpt": "CAME, gradient checkpointing"}.get(recipe, recipe)
    rows = [
        f"| peak per GPU (GB), 15 pairs per step, {named} | 512 px | 1024 px |",
        "|---|---|---|",
    ]
    for v, label in GPU_ROWS.items():
        gb = [by[f"{px}px_vae_batch_16"].get(v) for px in (512, 1024)]
        cells = [f"{x['peak_mb'] / 1024:.1f}" for x in gb if x]
        rows += [f"| {label} | " + " | ".join(cells) + " |"] * (len(cells) == 2)
    return "\n".join(rows)
