"""The LeGrad computation: private to the package (``captum_legrad._core``).

Nothing here knows a model family: everything family-specific comes in through the
:class:`~captum_legrad.spec.ViTSpec`. The modules, from the bottom up:

* :mod:`.options`: the allowed values of the options, and their validation;
* :mod:`.arguments`, :mod:`.targets`: the argument rules LeGrad and the baselines share;
* :mod:`.hooks`: forward hooks that act only in the calling thread;
* :mod:`.grad_mode`: the grad-mode protocol of one forward;
* :mod:`.attention`: what an attention call is (classifier, argument binding, masks);
* :mod:`.records`: the attention-record protocol and its two implementations;
* :mod:`.recorders`: the torch-function modes that record attention calls;
* :mod:`.linear`: the lean route's input-gradient-only linears;
* :mod:`.routes`: the lean and explicit routes;
* :mod:`.capture`: recording and block capture for one forward;
* :mod:`.groups`: parallel attention calls as head groups of one attention;
* :mod:`.compute`: the forward, the readouts and the one backward;
* :mod:`.maps`: aggregation, upsampling, normalisation and the output forms;
* :mod:`.resize`: any input size, the position embedding resampled for one call.

What tests and extension authors may rely on is re-exported, documented, by
:mod:`captum_legrad.internals`.
"""
