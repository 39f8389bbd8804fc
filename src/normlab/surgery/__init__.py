"""Whole-model transforms: population statistics, conversion, fusion, freezing."""

from normlab.surgery.population import PopulationStatsReport, recompute_population_stats

__all__ = ["PopulationStatsReport", "recompute_population_stats"]
