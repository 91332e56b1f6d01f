"""The toy world: a procedural scene generator (scene, draw, captions), its DreamBooth subjects,
the build script of the learned `toyworld` base model, the judge that reads pictures, and the
study helpers that turn a run into the judge's numbers. The committed weights (weights/) are data."""
