"""The CIFAR-100 and FEMNIST studies (issue 31): their cells in priority order, the caveats of each
data copy on its page, and each page as `fedmr study report` writes it today."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from fedmr.study.index import resolve
from fedmr.study.report import Page
from fedmr.study.spec import load_study

REPO = Path(__file__).resolve().parents[1]
STUDIES = {"studies/cifar100-cnn.toml": "docs/results/cifar100.md", "studies/femnist-cnn.toml": "docs/results/femnist.md"}


@pytest.fixture
def at_repo():
    here = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(here)


def test_the_cells_are_the_issues_priorities(at_repo):
    cifar = load_study("studies/cifar100-cnn.toml")
    assert Counter(c.priority for c in cifar.cells) == {1: 8, 2: 6, 3: 10}
    first = {(c.cfg.algorithm, c.cfg.section("fedmr")["first_stage_rounds"], c.cfg.alpha, c.cfg.seed)
             for c in cifar.cells if c.priority == 1}
    assert first == {(a, f, alpha, 1) for a, f in (("fedavg", 0), ("scaffold", 0), ("fedmr", 0), ("fedmr", 50))
                     for alpha in (0.1, 0.5)}
    assert {(c.cfg.alpha, c.cfg.seed) for c in cifar.cells if c.priority == 2} == {(0.1, 2), (0.1, 3)}
    assert all(c.cfg.dataset == "cifar100" and c.cfg.rounds == 500 and c.cfg.clients_per_round == 10
               for c in cifar.cells)
    femnist = load_study("studies/femnist-cnn.toml")
    assert Counter(c.priority for c in femnist.cells) == {1: 4, 2: 6, 3: 5}
    assert all(c.cfg.partition == "natural" and c.cfg.num_clients == 300 and c.cfg.clients_per_round == 30
               and c.cfg.model == "cnn_femnist" and c.cfg.rounds == 500 for c in femnist.cells)
    # the paper's local settings on both
    for c in cifar.cells + femnist.cells:
        assert (c.cfg.local_epochs, c.cfg.batch_size, c.cfg.lr, c.cfg.momentum) == (5, 50, 0.01, 0.5)
    assert cifar.report != femnist.report and "README.md" not in str(cifar.report) + str(femnist.report)


@pytest.mark.parametrize("study_file, page", STUDIES.items())
def test_each_page_is_current_and_states_the_copys_caveat(at_repo, study_file, page):
    study = load_study(study_file)
    text = Page(study, resolve(study), study_file, draw=False).render()
    assert text == Path(page).read_text(), f"regenerate it: fedmr study report {study_file}"
    caveat = "train/test split is not the" if "cifar100" in study_file else "It is a biased subset"
    assert caveat in " ".join(text.split())
