"""The Python snippets on the documentation pages run, page by page, against a small model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import precisebn

from reference import assert_matches, pooled_inputs

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["index.md", "quickstart.md", "recipes.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


class Net(nn.Module):
    """The model the pages describe: BN layers ``backbone.1``, ``backbone.4``, ``head.3``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# The models are tiny: one thread is several times faster than two on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def train_one_epoch(model: nn.Module, loader: Any) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for images, labels in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def snippets(page: str) -> list[str]:
    blocks = FENCE.findall((DOCS / page).read_text())
    return [block for block in blocks if "--8<--" not in block]


def namespace() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    loader = [
        (torch.randn(16, 3, 8, 8, generator=gen) + 1, torch.randint(0, 5, (16,), generator=gen))
        for _ in range(8)
    ]
    torch.manual_seed(0)
    return {
        "torch": torch,
        "precisebn": precisebn,
        "model": Net(),
        "train_loader": loader,
        "images": torch.randn(4, 3, 8, 8, generator=gen),
        "train_one_epoch": train_one_epoch,
    }


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = snippets(page)
    assert blocks, f"{page} has no python snippets"
    scope = namespace()
    model = scope["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page}[{index}]", "exec"), scope)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page}, python block {index} failed:\n{block}") from error
    printed = capsys.readouterr().out
    if page == "quickstart.md":
        # The outputs shown as comments are what the snippets print.
        assert "8 128\n" in printed
        assert "['backbone.1.running_mean', 'backbone.1.running_var']" in printed
    # Every page ends by recomputing buffers; they must be real statistics.
    new = scope["new"]
    assert type(new) is dict
    if page != "recipes.md":  # recipes swap in models of their own
        assert_matches(new, pooled_inputs(scope["model"], [b for b, _ in scope["train_loader"]]))
    if page == "index.md":
        # The page loads the result into the model.
        after = model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in new)


def test_how_many_batches_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The page's tol=1e-2 converges on a loader long enough for it, without a warning."""
    scope = namespace()
    gen = torch.Generator().manual_seed(1)
    scope["train_loader"] = [
        (torch.randn(64, 3, 8, 8, generator=gen) + 1, torch.zeros(64)) for _ in range(512)
    ]
    for index, block in enumerate(snippets("how-many-batches.md")):
        exec(compile(block, f"how-many-batches.md[{index}]", "exec"), scope)
    info = scope["info"]
    assert info.converged is True
    assert info.num_batches % 16 == 0
    assert info.num_batches < 512
    printed = capsys.readouterr().out
    assert f"{info.num_batches} True" in printed
    assert "rel. error" in printed


def test_ensembles_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    scope = namespace()
    for index, block in enumerate(snippets("ensembles.md")):
        exec(compile(block, f"ensembles.md[{index}]", "exec"), scope)
    printed = capsys.readouterr().out
    assert "torch.Size([8, 8])" in printed
    assert printed.count("t=") == 5
    assert scope["prediction"].shape == (4, 5)
    torch.testing.assert_close(scope["prediction"].sum(-1), torch.ones(4))
    for net, new in zip(scope["subnets"], scope["results"], strict=True):
        assert torch.equal(net[1].running_var, new["1.running_var"])


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")
@pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")
@pytest.mark.parametrize("page", ["migrating.md", "lightning.md", "huggingface.md"])
def test_integration_page_snippets_run(page: str) -> None:
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")
    scope = namespace()
    model = scope["model"]
    for index, block in enumerate(snippets(page)):
        exec(compile(block, f"{page}[{index}]", "exec"), scope)
    if page == "migrating.md":  # the drop-ins wrote the exact statistics
        want = precisebn.recompute_bn_buffers(model, scope["train_loader"])
        for key, value in want.items():
            torch.testing.assert_close(model.get_buffer(key), value)


def test_quickstart_functional_form_matches_recompute() -> None:
    scope = namespace()
    *_, functional = snippets("quickstart.md")
    exec(functional, scope)
    expected = precisebn.recompute_bn_buffers(scope["model"], scope["train_loader"])
    # The same float64 statistics up to rounding (recompute pools batches in blocks, the
    # functional loop one at a time): at most a couple of float32 ulps apart.
    for key, value in expected.items():
        torch.testing.assert_close(scope["buffers"][key], value, rtol=2.5e-7, atol=1e-12)


def test_quickstart_functional_call_uses_the_new_buffers() -> None:
    scope = namespace()
    model = scope["model"].eval()
    new = precisebn.recompute_bn_buffers(model, scope["train_loader"])
    with torch.no_grad():
        via_call = torch.func.functional_call(model, new, (scope["images"],))
        precisebn.apply_bn_buffers(model, new)
        applied = model(scope["images"])
    torch.testing.assert_close(via_call, applied)


def test_adaptation_snippets_run() -> None:
    scope = namespace()
    gen = torch.Generator().manual_seed(2)
    scope["target_loader"] = [torch.randn(16, 3, 8, 8, generator=gen) * 2 + 1 for _ in range(4)]
    scope["test_loader"] = scope["target_loader"]
    model = scope["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for index, block in enumerate(snippets("adaptation.md")):
        exec(compile(block, f"adaptation.md[{index}]", "exec"), scope)
    assert scope["logits"].shape == (16, 5)
    assert scope["state"]["head.3"].count.item() == 4 * 16
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed
    assert all("running" in k for k in changed)  # load_state_dict(new) wrote statistics only
