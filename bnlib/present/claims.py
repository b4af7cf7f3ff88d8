"""The sources' claims that the book tests, and the verdicts its chapters reach.

Each claim has a key. The chapter that decides it

- puts the label ``(claim-<key>)=`` before the heading of the section that shows it, and
- calls :func:`glue_verdict` in the cell whose check decides it, with a verdict computed from the
  same measured numbers the check asserts on.

The claims page reads the verdicts back from the executed chapters (:func:`read_verdicts`) and
shows them in one table (:func:`verdict_table`), so a verdict changes only when its check does.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

from bnlib.present.report import glue

__all__ = ["CLAIMS", "VERDICTS", "Claim", "claim_label", "glue_verdict", "read_verdicts", "verdict_table"]

#: the verdicts a claim can get, from best to worst
VERDICTS = ("holds", "holds with a caveat", "does not hold here", "wrong")

SOURCES = {
    "000": "explainer 000 (definition, advantages and limitations tables)",
    "001": "explainer 001 (the mathematics, Santurkar et al.)",
    "002": "blog post 002 (DL Basic)",
    "003": "explainer 003 (mini-batches, train vs inference)",
    "004": "explainer 004 (normalization in general)",
}


@dataclass(frozen=True)
class Claim:
    """One claim a source makes, and the chapter that tests it.

    Args:
        key: short identifier, used in the label ``claim-<key>`` and the glue ``verdict-<key>``.
        claim: the claim, in English.
        korean: the source's words.
        sources: the source files that make it (``"000"`` .. ``"004"``).
        chapter: the notebook (in ``book/``, without suffix) whose check decides it.
    """

    key: str
    claim: str
    korean: str
    sources: tuple[str, ...]
    chapter: str


#: every claim of the sources that a chapter decides, in the order of the claims page
CLAIMS: tuple[Claim, ...] = (
    Claim(
        "unit-range",
        "After normalization the values lie in [-1, 1].",
        "정규화를 통해 데이터의 범위는 [-1, 1]이 될 것이다.",
        ("002",),
        "formulas",
    ),
    Claim(
        "jacobian-approximate",
        "∂x̂/∂x ≈ (1/σ)(I − 11ᵀ/m − x̂x̂ᵀ/m): written with ≈, as a simplified form that holds only approximately.",
        "논문에서는 이를 다음과 같이 유도합니다 (단순화된 형태): ∂x̂/∂x ≈ (1/σ)(I − 11ᵀ/m − x̂x̂ᵀ/m)",
        ("001",),
        "formulas",
    ),
    Claim(
        "gamma-beta-restore",
        "γ and β give the network the freedom to restore the original distribution when needed "
        "(the identity mapping), so normalization costs no representational power.",
        "필요에 따라 원래 데이터의 분포를 복원(Identity Mapping)할 수 있는 자유도를 부여 … 원래의 표현력을 유지",
        ("001", "000"),
        "formulas",
    ),
    Claim(
        "jacobian-near-one",
        "BN keeps the eigenvalues of the backward Jacobians near 1, so gradients do not vanish.",
        "Jacobian 행렬의 고유값(Eigenvalue)들이 1 근처에 머물도록 도와주어",
        ("001",),
        "formulas",
    ),
    Claim(
        "reduces-ics",
        "BN reduces internal covariate shift (002: it removes it, normalizing at every layer).",
        "내부 공변량 변화 문제를 완화하는 데 사용된다 (003) … 매번 정규화를 하여 내부 공변량 변화를 없앤다 (002)",
        ("000", "002", "003", "004"),
        "covariate_shift",
    ),
    Claim(
        "per-channel",
        "In a convolutional layer the statistics are computed per channel, over N×H×W.",
        "Conv layer의 경우 N×C×H×W 형상에서 C 채널별로 평균과 분산을 계산합니다.",
        ("000",),
        "conv_statistics",
    ),
    Claim(
        "deterministic-inference",
        "Training uses batch statistics and inference the running ones; only this way is the output deterministic.",
        "추론 시: 학습 중 모은 Running Mean/Variance를 사용해 정규화 … "
        "이렇게 해야, deterministic output을 보장할 수 있음",
        ("000",),
        "train_vs_inference",
    ),
    Claim(
        "higher-learning-rate",
        "BN allows larger learning rates, and so trains faster.",
        "학습 속도 증가: 정규화로 인해 더 큰 학습률 사용 가능",
        ("000", "002", "004"),
        "benefits",
    ),
    Claim(
        "regularizes",
        "BN regularizes: its batch noise acts like dropout and reduces overfitting.",
        "Dropout과 유사한 약간의 규제 효과(Overfitting 방지)",
        ("000", "001", "004"),
        "benefits",
    ),
    Claim(
        "init-insensitive",
        "BN makes training less sensitive to the initialization.",
        "초기화에 덜 민감: 초기 가중치 설정이 완벽하지 않아도 안정적으로 학습",
        ("000", "001", "002"),
        "benefits",
    ),
    Claim(
        "gradient-flow",
        "BN mitigates (001: prevents) vanishing and exploding gradients.",
        "기울기 소실/폭주 문제를 완화하여 더 깊은 네트워크를 훈련할 수 있게",
        ("000", "001", "004"),
        "benefits",
    ),
    Claim(
        "automatic-rate-tuning",
        "Scale invariance acts like an adaptive learning rate: weights grown large get smaller gradients, "
        "small weights larger ones, which speeds learning.",
        "가중치가 너무 커져서 발산하려 하면 그라디언트를 줄여 안정을 찾고, 가중치가 작으면 그라디언트를 키워 "
        "학습을 가속화합니다 … 적응형 학습률(Adaptive Learning Rate)처럼 작동",
        ("001",),
        "scale_invariance",
    ),
    Claim(
        "smoother-landscape",
        "BN makes the loss landscape smoother (smaller Lipschitz constants).",
        "Loss Function의 지형(Landscape)을 부드럽게(Smoothing) 만든다",
        ("001",),
        "smoothing",
    ),
    Claim(
        "global-minimum",
        "The smoother landscape lets training use large learning rates without diverging and converge "
        "quickly to the global minimum.",
        "더 큰 학습률(High Learning Rate)을 사용해도 발산하지 않고 최적해(Global Minima)로 빠르게 수렴하게 만듭니다",
        ("001",),
        "smoothing",
    ),
    Claim(
        "small-batches-rnns",
        "With small batches BN's statistics are inaccurate, and BN does not suit RNNs and other "
        "order-sensitive models (use LayerNorm, GroupNorm or InstanceNorm instead).",
        "작은 배치 크기에서 부정확한 통계 … 순서 민감성: RNN, 시계열 등에 적합하지 않음",
        ("000",),
        "limitations",
    ),
    Claim(
        "inference-cost",
        "Running statistics make inference more complex.",
        "추론 시 복잡도 증가: Running stat 관리 필요",
        ("000",),
        "benchmarks",
    ),
)

_BY_KEY = {c.key: c for c in CLAIMS}


def claim_label(key: str) -> str:
    """The MyST label of the section that decides claim ``key``: ``claim-<key>``.

    Args:
        key: a key of :data:`CLAIMS`.
    """
    if key not in _BY_KEY:
        raise KeyError(f"unknown claim {key!r}; known: {', '.join(_BY_KEY)}")
    return f"claim-{key}"


def glue_verdict(key: str, verdict: str) -> str:
    """Glue the verdict on claim ``key`` as ``verdict-<key>``, for the claims page; returns it.

    Call it in the cell whose check decides the claim, with a verdict computed from the numbers
    that check asserts on.

    Args:
        key: a key of :data:`CLAIMS`.
        verdict: one of :data:`VERDICTS`.
    """
    claim_label(key)  # raises for an unknown key
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    glue(f"verdict-{key}", verdict)
    return verdict


def read_verdicts(book: Path | str) -> dict[str, str]:
    """The verdicts glued in the executed chapters under ``book``, claim key -> verdict.

    Args:
        book: the folder holding the chapter notebooks.

    Raises:
        ValueError: a chapter glues a verdict on a claim it does not own, or one it owns is missing.
    """
    found: dict[str, str] = {}
    for chapter in sorted({c.chapter for c in CLAIMS}):
        path = Path(book) / f"{chapter}.ipynb"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: the claims page reads the executed chapters beside it "
                "(open it in a copy of the whole book, not on its own)"
            )
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            for output in cell.get("outputs", []):
                name = output.get("metadata", {}).get("scrapbook", {}).get("name", "")
                if not name.startswith("verdict-"):
                    continue
                key = name.removeprefix("verdict-")
                if key not in _BY_KEY or _BY_KEY[key].chapter != chapter:
                    raise ValueError(f"{path.name} glues {name!r}, which is not one of its claims")
                text = next(v for k, v in output["data"].items() if k.endswith("text/plain"))
                found[key] = ast.literal_eval("".join(text))
    missing = [c.key for c in CLAIMS if c.key not in found]
    if missing:
        raise ValueError(f"no verdict glued for: {', '.join(missing)} (execute their chapters)")
    return found


def verdict_table(book: Path | str) -> str:
    """The claims and their verdicts as a MyST table, each linked to the section that decides it.

    Args:
        book: the folder holding the executed chapter notebooks.
    """
    verdicts = read_verdicts(book)
    rows = [
        "| claim | source's words | sources | verdict | decided in |",
        "|---|---|---|---|---|",
    ]
    for c in CLAIMS:
        rows.append(
            f"| {c.claim} | {c.korean} | {', '.join(c.sources)} | **{verdicts[c.key]}** "
            f"| {{ref}}`{claim_label(c.key)}` |"
        )
    return "\n".join(rows)
