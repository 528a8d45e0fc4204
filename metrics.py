"""Evaluation without downloads (Tab. 2 analogues) of the run's samplers, all on the same noise.

Distance to held-out data: sliced Wasserstein-1 (toy2d) or the Fréchet distance in a small
classifier's penultimate features (images; trained once, cached). Alignment: share of samples
nearest their class's mixture mean (toy2d) or classified as their prompt's class. Inputs: FM units.
"""

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as nnf
from torch import nn
from tqdm import tqdm

from checkpoint import config_hash, save_module, seeded_or_cached
from config import Config
from runtime import autocast, clock
from sampler import consistency_sample, default_times
from toy import load_data, ring_centers
from trajectory import reference_route, rollout
from trigflow import TrigFlow

DISTANCE_NAME = {
    "toy2d": "sliced_wasserstein",
    "digits": "frechet_classifier",
    "cifar10": "frechet_classifier",
}


def _quantiles(v: torch.Tensor, m: int) -> torch.Tensor:
    """Empirical quantile function of the columns of v [n, P] at the m mid-points (k + 1/2)/m."""
    v = v.sort(0).values
    pos = ((torch.arange(m, dtype=v.dtype) + 0.5) / m * len(v) - 0.5).clamp(0, len(v) - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=len(v) - 1)
    return torch.lerp(v[lo], v[hi], (pos - lo)[:, None])  # linear interpolation, [m, P]


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, n_proj: int = 512, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-1 (Rabin et al. 2011): mean over random unit directions θ of W1(θ·a, θ·b),
    the mean gap between quantile functions (unequal sizes: on a common grid). W1, not W2: W2 grows
    like sqrt(mass imbalance between modes), so its real-vs-real floor is large, slow to shrink."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    theta = torch.randn(a.shape[1], n_proj, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # [D, P] unit directions
    m = max(len(a), len(b))
    w1 = (_quantiles(a @ theta, m) - _quantiles(b @ theta, m)).abs().mean(0)  # [P]
    return w1.mean().item()


def frechet_distance(feat_a: torch.Tensor | np.ndarray, feat_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance (FID formula, Heusel et al. 2017) of Gaussians fitted to two feature sets:
    ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½)."""
    a, b = np.asarray(feat_a, dtype=np.float64), np.asarray(feat_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # sqrtm of a product of PSD matrices; tiny imaginary parts from round-off are dropped
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


# --------------------------------------------------------------------------------- image classifier
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Feature/label classifier for image metrics (hashed for the cache key)."""

    backbone: str
    in_channels: int
    image_size: int
    num_classes: int
    width: int = 16  # conv channels of the first stage (doubled per stage)
    stages: int = 2  # each stage: two 3×3 convs then 2× average pooling (8×8 → 2×2 for digits)
    feat_dim: int = 64  # penultimate features used by the Fréchet distance
    steps: int = 1500  # digits: ~97% held-out accuracy in ~5 s
    batch_size: int = 64
    lr: float = 2e-3  # AdamW
    noise_std: float = 0.1  # Gaussian input noise (augmentation): robust to imperfect samples
    seed: int = 0


CLASSIFIERS = {
    "digits": ClassifierConfig("digits", 1, 8, 10),
    "cifar10": ClassifierConfig("cifar10", 3, 32, 10, width=32, stages=3, feat_dim=128, steps=3000),
}


class Classifier(nn.Module):
    """Small conv net: `features(x)` = penultimate activations, `forward(x)` = class logits."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        layers, c = [], cfg.in_channels
        for i in range(cfg.stages):
            w = cfg.width * 2**i
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1)]
            layers += [nn.SiLU(), nn.AvgPool2d(2)]
            c = w
        side = cfg.image_size // 2**cfg.stages
        self.body = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(c * side**2, cfg.feat_dim), nn.SiLU()
        )
        self.head = nn.Linear(cfg.feat_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@torch.enable_grad()  # training works even when called under torch.no_grad()
def train_classifier(
    backbone: str,
    data_dir: str | None = None,
    device: str = "cpu",
    cache_root: str = "runs/classifiers",
    cfg: ClassifierConfig | None = None,
    progress: bool = False,
) -> Classifier:
    """Metric classifier trained on the train split; cached in cache_root/<backbone>-<hash>/."""
    cfg = cfg or CLASSIFIERS[backbone]
    folder = Path(cache_root) / f"{backbone}-{config_hash(cfg)}"
    net, cached = seeded_or_cached(Classifier, cfg, folder, device)
    if cached:
        return net
    x, y, _ = load_data(backbone, "train", data_dir)
    x, y = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)  # cosine decay to 0
    for _ in tqdm(range(cfg.steps), desc=f"classifier {backbone}", disable=not progress):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g).to(device)
        x_in = x[idx] + cfg.noise_std * torch.randn(x[idx].shape, generator=g).to(x)
        loss = nnf.cross_entropy(net(x_in), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    save_module(net, cfg, folder)
    return net.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------- evaluate
class Evaluator:
    """Distance to the held-out set and alignment for one backbone; loads data/classifier once."""

    def __init__(
        self,
        backbone: str,
        data_dir: str | None = None,
        device: str = "cpu",
        cache_root: str = "runs/classifiers",
        seed: int = 0,
    ):
        self.backbone, self.device, self.seed = backbone, device, seed
        self.name = DISTANCE_NAME[backbone]
        self.x_train, _, _ = load_data(backbone, "train", data_dir)
        self.x_test, self.y_test, _ = load_data(backbone, "test", data_dir)
        self.classifier = None
        if backbone != "toy2d":
            self.classifier = train_classifier(backbone, data_dir, device, cache_root)
            self.feat_test = self._features(self.x_test)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(c.to(self.device)).cpu() for c in x.split(512)])

    @torch.no_grad()
    def _distance(self, x: torch.Tensor) -> float:
        if self.classifier is None:
            g = torch.Generator().manual_seed(self.seed)  # the same directions for every call
            return sliced_wasserstein(x, self.x_test, generator=g)
        return frechet_distance(self._features(x), self.feat_test)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """{"distance", "alignment"} of samples x (FM units; images clipped to [−1, 1])."""
        x, y = x.detach().float().cpu(), y.cpu()
        if self.classifier is None:
            # toy2d: the nearest mixture mean should be the prompt's class
            pred = torch.cdist(x, ring_centers()).argmin(1)
        else:
            x = x.clamp(-1, 1)  # images are clipped before evaluation, as when saved
            logits = [self.classifier(c.to(self.device)).cpu() for c in x.split(512)]
            pred = torch.cat(logits).argmax(1)
        return {"distance": self._distance(x), "alignment": (pred == y).double().mean().item()}

    def floor(self, n: int) -> dict[str, float]:
        """Real-vs-real floor: min(n, all) training points (a fixed random subset) against the
        held-out set: what a sampler reproducing the training data exactly gets with n samples."""
        perm = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(self.seed))
        return {"distance": self._distance(self.x_train[perm[:n]])}


# ------------------------------------------------------------------------------- the run's samplers
@torch.no_grad()
def evaluate_samplers(
    cfg: Config, teacher: Any, ema: nn.Module
) -> tuple[dict, dict[str, torch.Tensor]]:
    """metrics.json's eval block: the real-vs-real floor, teacher@N (Eq. 9 with CFG on the reference
    route) and the student's 1/2/4-step consistency sampling (App. E), all from the same noise and
    prompts. `teacher` is a backbones.Teacher; returns (results, the first samples of each sampler
    as images for samples.png)."""
    n, dev = cfg.n_eval, cfg.device
    prompt = (torch.arange(n) % len(teacher.prompt_names)).to(dev)
    gen_z = torch.Generator().manual_seed(cfg.seed + 1)
    z = cfg.sigma_d * torch.randn((n, *teacher.data_shape), generator=gen_z)
    z, w = z.to(dev), torch.full((n,), cfg.eval_w, device=dev)
    F_teacher = TrigFlow(teacher.velocity, uncond=teacher.uncond)
    F_ema = TrigFlow(ema, guidance_scale=cfg.guidance_scale)
    # DEVIATION (paper Tab. 2: the teacher at 20 steps of its own solver); here teacher@N is Eq. 9's
    # Euler/DDIM step on the deterministic reference route, with CFG: 2N evaluations
    # — see tests/test_train.py::test_run_directory_contract
    route = reference_route(cfg.eval_teacher_steps, cfg.shift)
    samplers = {"teacher@N": (2 * cfg.eval_teacher_steps, None)} | {
        f"student@{k}": (k, default_times(k, cfg.t_mid)) for k in (1, 2, 4)
    }
    res, shown, ref = {"distance_name": teacher.distance_name, "data": teacher.floor(n)}, {}, None
    for name, (nfe, times) in samplers.items():

        def sample(zi, ci, wi, gen, times=times):
            with autocast(cfg.device, cfg.precision):
                if times is None:
                    return rollout(F_teacher, zi, route, ci, wi, cfg.sigma_d).x0
                return consistency_sample(
                    lambda x, t: F_ema(x, t, ci, wi), zi, times, cfg.sigma_d, gen
                )

        # warm-up, untimed; the timed region starts and ends with the device idle (CUDA is async)
        sample(z[:2], teacher.cond(prompt[:2]), w[:2], torch.Generator(device=dev))
        gen, xs, t0 = torch.Generator(device=dev).manual_seed(cfg.seed + 2), [], clock(dev)
        for i in range(0, n, cfg.eval_batch):
            chunk = slice(i, i + cfg.eval_batch)
            cond = teacher.cond(prompt[chunk])
            xs.append(sample(z[chunk], cond, w[chunk], gen).float() / cfg.sigma_d)
        elapsed, samples = clock(dev) - t0, torch.cat(xs)  # FM units (data space)
        ref = samples if times is None else ref  # teacher@N comes first: the paired reference
        n_shown = 2000 if samples.dim() == 2 else min(n, 2 * len(teacher.prompt_names))
        shown[name] = teacher.to_images(samples[:n_shown]).cpu()
        stats = teacher.evaluate(samples, prompt, ref)
        res[name] = {**stats, "nfe": nfe, "samples_per_s": n / elapsed}
    return res, shown
