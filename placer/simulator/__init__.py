"""Discrete-event simulator of expert-parallel MoE serving (docs/simulator.md).

``simulate`` runs one placement (``placer.app.comparison`` runs several with the same seeds and
writes the results layout, docs/simulator-results.md); ``render_report`` turns it into HTML;
``a2a_benchmark`` times one dispatch and combine. ``simulate(..., cost_model=...)`` takes any
:class:`StepCostModel` factory (default :class:`CostModel`); ``register_kernel`` adds an
all-to-all kernel (docs/simulator.md). Importing this package imports numpy and pandas only.
"""

from placer.simulator.a2a import a2a_benchmark, random_routing
from placer.simulator.config import (
    KERNEL_PRESETS,
    KERNELS,
    ComputeParams,
    NetworkParams,
    ReplayWorkload,
    ServingWorkload,
    SimConfig,
    kernel_preset,
)
from placer.simulator.cost import CostModel, CostModelFactory, StepCostModel
from placer.simulator.network_kernels import NetworkKernel, kernel_names, register_kernel
from placer.simulator.report import render_report
from placer.simulator.results import RunOutput, SimResults, read_results, write_results
from placer.simulator.simulate import simulate, simulate_many

__all__ = [
    "KERNELS", "KERNEL_PRESETS", "ComputeParams", "CostModel", "CostModelFactory", "NetworkKernel",
    "NetworkParams", "ReplayWorkload", "RunOutput", "ServingWorkload", "SimConfig", "SimResults",
    "StepCostModel", "a2a_benchmark", "kernel_names", "kernel_preset", "random_routing",
    "read_results", "register_kernel", "render_report", "simulate", "simulate_many", "write_results",
]
