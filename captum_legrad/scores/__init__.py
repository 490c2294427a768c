"""What LeGrad explains besides a classifier's logits: modules that turn a model into one
whose scores are the targets, and that describe themselves to LeGrad (``legrad_spec``).

* :class:`~captum_legrad.ImageTextSimilarity` (:mod:`.text`): cosine similarities to text
  prompts;
* :class:`~captum_legrad.ImageImageSimilarity` (:mod:`.image`): cosine similarities to
  reference images (retrieval, deduplication, k-NN);
* :class:`~captum_legrad.FeatureDirection` (:mod:`.features`): projections of the image
  embedding on directions (a linear probe's rows, SAE features);
* :class:`~captum_legrad.AnswerLogits` and :func:`~captum_legrad.explain_answer`
  (:mod:`.vlm`): the answer tokens of a vision-language model.

The first three are scores of a model's image embedding and share
:class:`.embedding.EmbeddingScores`. All are exported from the package root.
"""
