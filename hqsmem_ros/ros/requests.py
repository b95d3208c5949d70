"""The node's requests: ~/prompts, ~/add_objects, ~/remove_objects (applied with the next frame,
the services waiting for its outcome up to service_timeout) and ~/reset (at once).

A mixin of the tracking node (hqsmem_ros.ros.node._Tracking): it uses the node's session,
_cond, _requests and _pipe_lock; what a request does and its outcome are the stream session's.
"""
from __future__ import annotations

from hqsmem_ros.msg import ObjectPromptArray
from hqsmem_ros.stream.session import Request


class RequestIO:
    """Prompt topic and services (mixed into the tracking node)."""

    def _on_prompts(self, msg: ObjectPromptArray) -> None:
        if not msg.prompts:
            return
        self._enqueue(Request("~/prompts", list(msg.prompts), []))

    def _enqueue(self, req: Request) -> bool:
        """Queue a request for the next frame, or refuse it now if it needs no frame to be wrong."""
        reason = self.session.precheck(req)
        if reason:
            self.session.refuse(req, reason)
            return False
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()
        return True

    def _on_add_objects(self, request, response):
        req = Request("~/add_objects", list(request.prompts), [])
        if not req.prompts:
            response.success, response.message = False, "no prompts given"
            return response
        self._submit_and_wait(req)
        response.success, response.message, response.ids = req.success, req.message, req.ids
        return response

    def _on_remove_objects(self, request, response):
        req = Request("~/remove_objects", [], [int(i) for i in request.ids])
        if not req.remove:
            response.success, response.message = False, "no ids given"
            return response
        self._submit_and_wait(req)
        response.success, response.message = req.success, req.message
        response.removed_ids = req.remove if req.success else []
        return response

    def _on_reset(self, request, response):
        with self._pipe_lock:
            cleared = self.session.reset("reset requested on ~/reset")
        response.success = True
        response.message = f"tracker reset; retired ids {cleared}" if cleared else "tracker reset"
        response.cleared_ids = cleared
        return response

    def _submit_and_wait(self, req: Request) -> None:
        if not self._enqueue(req):
            return
        timeout = float(self.get_parameter("service_timeout").value)
        if not req.done.wait(timeout):
            with self._cond:
                if not req.taken:  # no frame came: withdraw it, nothing was applied
                    self._requests.remove(req)
                    self.session.refuse(req, f"no camera frame arrived within {timeout:g} s "
                                             f"(service_timeout); nothing was applied")
                    return
            req.done.wait()  # a frame is being processed with it right now


    def _requeue(self, req: Request) -> None:
        """The frame could not be used: the request waits for the next one."""
        with self._cond:
            req.taken = False
            self._requests.appendleft(req)

