"""The explainer service: explains black-box misclassifications with a surrogate's gradients, asking the black box only through /predict."""
