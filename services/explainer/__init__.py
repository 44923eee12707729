"""The explainer service: a black box's mistakes explained with a surrogate's gradients, the box asked via /predict."""
