"""The Prefect flows (lifecycle, retraining, human labelling, publishing) and what a person sees of them."""
