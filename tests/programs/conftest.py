"""Shared fixtures: the trained tiny task model and the generative fuser (cached after their first training), with
their captured decode steps."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    from examples.llama_workload import DECODE_DYNAMIC, decode_inputs
    from examples.models.llama import LlamaDecodeStep
    from examples.models.tiny_task import load_or_train, make_problems
    from lmforge.ir.frontends.torch_export import capture

    model = load_or_train("tiny")
    prompts, _ = make_problems(2, seed=0)
    step = capture(LlamaDecodeStep(model), decode_inputs(model, prompts, 5), dynamic=DECODE_DYNAMIC)
    return model, step


@pytest.fixture(scope="session")
def fuser():
    """The trained generative fuser (examples/models/fuser_task.py) and its captured decode step."""
    from examples.llama_workload import DECODE_DYNAMIC, decode_inputs
    from examples.models.fuser_task import load_or_train_fuser
    from examples.models.llama import LlamaDecodeStep
    from examples.models.tiny_task import make_problems
    from lmforge.ir.frontends.torch_export import capture

    model = load_or_train_fuser()
    prompts, _ = make_problems(2, seed=0)
    return model, capture(LlamaDecodeStep(model), decode_inputs(model, prompts, 5), dynamic=DECODE_DYNAMIC)


@pytest.fixture(scope="session")
def task():
    from examples.models.tiny_task import make_problems

    return make_problems(24, seed=7)


@pytest.fixture(scope="session", autouse=True)
def addition_checker():
    from examples.test_time_scaling import register_task_functions

    register_task_functions()
    torch.manual_seed(0)
