"Shared fixtures: the reference decoder (Hugging Face generate) and the models under test."
import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # tests never reach the hub: fail fast instead of retrying for ~20 s
import pytest, torch
from specdec import load_model
from specdec.models import perturbed


SMOL_DRAFT_NOISE = 0.05   # relative noise on SmolLM2's weights for its co-seeded draft


def hf_greedy(target, prompt, max_new_tokens, eos_token_id=None):
    "Hugging Face `generate(do_sample=False)` of the same target: the reference output, prompt excluded."
    kw = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    out = target.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=target.eos_token_ids[0], **kw)
    return out[:, prompt.shape[1]:]


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_draft():
    "tiny-llama's weights plus 2% noise: a co-seeded draft that the target accepts often, not always."
    return load_model("tiny-llama-draft")


@pytest.fixture(scope="session")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_draft(smol):
    "SmolLM2's weights plus noise: a co-seeded draft with partial acceptance."
    return perturbed(smol, SMOL_DRAFT_NOISE, seed=1, name="smollm2-135m+noise")


class VirtualClock:
    "`time.sleep` advances it and `time.perf_counter` reads it: the loop's timings are the synthetic costs, under any load."
    def __init__(self): self.now = 0.0
    def sleep(self, seconds:float) -> None: self.now += max(seconds, 0.0)
    def perf_counter(self) -> float: return self.now


@pytest.fixture
def virtual_clock(monkeypatch):
    import time
    clock = VirtualClock()
    monkeypatch.setattr(time, "sleep", clock.sleep)
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    return clock
