"""Cost and capacity planner: chip profiles, a cost model of the R1 family, layouts, reports."""

from xpuserve.planner.chips import Chip, load_chips
from xpuserve.planner.models import BUILTIN_CONFIGS, resolve_model
from xpuserve.planner.plan import Options, PlanRow, Workload, plan

__all__ = ["BUILTIN_CONFIGS", "Chip", "Options", "PlanRow", "Workload", "load_chips", "plan", "resolve_model"]
