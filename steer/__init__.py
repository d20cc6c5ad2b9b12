"""steer: edit what a transformer's feed-forward layers write, while it generates."""
from .baselines import ActAddProcessor, LogitBiasProcessor, activation_addition, instructed, mean_difference
from .concepts import Concept, ConceptScorer, RankedVector, concept_scores, rank_vectors, toxicity_words
from .families import FAMILIES, Adapter, Family, UnsupportedModelError, family_of
from .models import load_model, model_name
from .names import VectorName
from .slots import install_slots, remove_slots
from .spec import Edit, Spec, SpecError
from .steering import HookedProcessor, SteeringProcessor, steering
from .vocab import VocabIndex

__all__ = [
    "ActAddProcessor", "HookedProcessor", "LogitBiasProcessor", "activation_addition", "instructed", "mean_difference",
    "Adapter", "Concept", "ConceptScorer", "Edit", "FAMILIES", "Family", "RankedVector", "Spec", "SpecError",
    "SteeringProcessor", "UnsupportedModelError", "VectorName", "VocabIndex", "concept_scores",
    "family_of", "install_slots", "load_model", "model_name", "rank_vectors", "remove_slots", "steering",
    "toxicity_words",
]
