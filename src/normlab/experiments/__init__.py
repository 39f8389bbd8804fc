"""Reference models, training loops and studies built from normlab layers."""

from normlab.experiments.demo import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
