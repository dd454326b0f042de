"""The "shapes" world: small synthetic images with exact ground truth, captions, yes/no questions and preference pairs.

A scene is 1-4 flat objects on a white (optionally cluttered) square canvas. Each object has a shape, a color, a size
and a position, the position being one cell of a 3 x 3 grid (at most one object per cell, so objects never touch: two
objects are always >= 2 px apart). Everything is drawn without anti-aliasing, so every object pixel has exactly its
palette color and the ground truth can be read back from the pixels (the tests do). The vocabulary is closed and small
so a tiny VLM learns it on a CPU in minutes:

==========  ========================================================================================================
shapes      circle, square, triangle, cross  (plurals: circles, squares, triangles, crosses)
colors      red, green, blue, yellow         (palette :data:`PALETTE`; clutter is gray, never a palette color)
sizes       small, large                     (side ~0.45 and ~0.8 of a grid cell)
positions   top left, top, top right, left, center, right, bottom left, bottom, bottom right  (the 3 x 3 grid)
counts      a (1), two, three, four
==========  ========================================================================================================

Captions (:func:`describe`) follow one deterministic grammar. Style ``"count"`` (default) groups the objects by
(color, shape) in vocabulary order (colors first, then shapes)::

    a red circle.
    a red circle and two blue squares.
    a red circle, a green cross and two blue squares.

Style ``"chain"`` is the same with every joint an "and" (``a red circle and a green cross and two blue squares.``): a
joint then never tells how many objects are left, so a preference pair that adds or drops an object first differs at
the object, not at a "," / "and" / "." (the demo's grammar; ``"count"``'s joints teach preference training to stop
early). Style ``"detailed"`` names every object with its size and position, in reading order (row-major over the grid)::

    a large red circle at the top left and a small blue square in the center.

:func:`parse_description` inverts both (and tolerates extra words); the metrics in :mod:`vpo.eval.metrics` use it.

Preference pairs (:func:`make_pair`): chosen = the true caption; rejected = the caption with exactly one hallucination,

- ``"absent"``: an extra mention of an object the scene does not have (an absent shape when the scene lacks one,
  else an absent (color, shape) combination);
- ``"color"``: one group's color changed to a color that shape does not have in the scene;
- ``"count"``: one group's count changed (1-4);

- ``"prior"``: the language prior's hallucination (below);

with the character spans of the hallucinated words in the rejected caption. The rejected caption keeps the canonical
group order, so word order never gives the answer away.

OViP's negative image (:func:`render_description`, :func:`scene_from_description`) is a scene matching a caption;
with ``base=`` it is the minimal edit of the original scene (recolor the object, add the absent object in a free
cell, add / remove instances), which keeps the rest of the picture, clutter included.

The language prior (:mod:`vpo.worlds.shapes.prior`): a :class:`CooccurrencePrior` ties object pairs (default circle ->
square, triangle -> cross) so that the SFT captions almost always mention the partner with its trigger (P = 0.95),
while the preference pairs and the held-out splits break the pattern (P = 0.5): the SFT model learns to say "a red
square" after "a red circle" whether or not a square is there, the held-out images measure it, and the pairs' rejected
captions carry exactly that hallucination.

The package, by seam: :mod:`~vpo.worlds.shapes.vocab` (the words), :mod:`~vpo.worlds.shapes.scene` (scenes and
rendering), :mod:`~vpo.worlds.shapes.captions` (grammar and parser), :mod:`~vpo.worlds.shapes.questions` (yes/no and
POPE), :mod:`~vpo.worlds.shapes.pairs` (preference pairs, negative images), :mod:`~vpo.worlds.shapes.prior` (the
co-occurrence prior) and :mod:`~vpo.worlds.shapes.datasets` (the JSONL writers). Everything is re-exported here.

Randomness: every function takes a ``numpy.random.Generator``; the dataset writers derive one generator per record
from ``(seed, split, index)``, so the output is byte-for-byte reproducible and record ``i`` does not depend on ``n``.

Example:
    >>> import numpy as np
    >>> from vpo.worlds import shapes
    >>> rng = np.random.default_rng(0)
    >>> scene = shapes.random_scene(rng)
    >>> image = shapes.render(scene)                      # a 64 x 64 RGB PIL image
    >>> pair = shapes.make_pair(scene, rng)
    >>> shapes.parse_description(pair.chosen) == shapes.parse_description(shapes.describe(scene))
    True
"""
from vpo.worlds.shapes.vocab import (  # noqa: F401
    _COUNT_OF_WORD, _NEGATIONS, _PLURAL, ANSWERS, BACKGROUND, CAPTION_STYLES, COLORS, COUNT_WORDS, DEFAULT_IMAGE_SIZE,
    DESCRIBE_PROMPTS, HALLUCINATION_KINDS, MAX_COUNT, PAIR_KINDS, PALETTE, POPE_MODES, POSITION_PHRASES, POSITIONS,
    SHAPES, SIZE_FRACTION, SIZES, all_kinds, existence_question, plural, split_words, vocabulary, word_span_mask)
from vpo.worlds.shapes.scene import Obj, Scene, random_scene, render  # noqa: F401
from vpo.worlds.shapes.captions import Mention, describe, mention_counts, parse_description  # noqa: F401
from vpo.worlds.shapes.questions import Question, pope_questions, yes_no_questions  # noqa: F401
from vpo.worlds.shapes.prior import (  # noqa: F401
    DEFAULT_PRIOR, DEFAULT_PRIOR_PAIRS, CooccurrencePrior, cooccurrence)
from vpo.worlds.shapes.pairs import (  # noqa: F401
    Hallucination, PreferencePair, make_pair, render_description, scene_from_description)
from vpo.worlds.shapes.datasets import (  # noqa: F401
    make_dataset, make_eval_dataset, make_sft_dataset, read_jsonl, record_rng)
