"""WebRTC: browser peers whose data channels speak the message envelope (aiortc).

Signaling is a set of operations (``tabagent.ops.webrtc``); the peers, their channels and the
session bookkeeping are in :mod:`tabagent.webrtc.sessions`.
"""
