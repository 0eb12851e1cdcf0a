__version__ = "0.1.0"

from .models import load_model, seed_everything
from .decode import generate, GenerationOutput
from .stats import Stats
