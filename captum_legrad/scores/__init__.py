"""What LeGrad explains besides a classifier's logits: modules that turn a model into one
whose scores are the targets, and that describe themselves to LeGrad (``legrad_spec``).

* :class:`~captum_legrad.ImageTextSimilarity` (:mod:`.text`): cosine similarities to text
  prompts;
* :class:`~captum_legrad.AnswerLogits` and :func:`~captum_legrad.explain_answer`
  (:mod:`.vlm`): the answer tokens of a vision-language model.

All are exported from the package root.
"""
