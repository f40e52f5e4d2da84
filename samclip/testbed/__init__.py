"""A ground-truth testbed: procedural scenes of coloured shapes with exact masks and captions.

``scenes`` draws one scene from a seed and an index. ``writer`` writes a dataset of scenes in the
layouts the pipeline reads: images with SA-1B-style JSON masks, captions, labels and VOC-style
semantic masks. Pure numpy and PIL: nothing here imports Ray, Prefect or storage libraries.
"""
