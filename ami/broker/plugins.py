"""amqtt 0.12.1 plugins that enforce the bus ACL table (ami.security.bus_acl).

Why not amqtt's stock TopicAccessControlListPlugin (all checked in 0.12.1):
  * its dataclass Config has only `acl` (subscribe, deprecated name) and
    `publish_acl`; `subscribe_acl` and `receive_acl` are rejected, so there
    is no per-delivery check in plugin-style config;
  * its matcher lets an allowed `+` cover a requested `#`;
  * Will messages bypass every topic check (the broker broadcasts them
    directly on an abnormal disconnect);
  * subscriptions belong to client ids, so another user who resumes a
    persistent session (clean_session=False, same client id) inherits
    its subscriptions; only a RECEIVE check stops that.
AclTopicPlugin checks publish, subscribe and receive against the table;
WillAclAuthPlugin refuses a CONNECT whose Will topic the user may not
publish to.  Both are listed in the broker config built by ami.broker.server.
"""

from __future__ import annotations

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from ami.security.bus_acl import acl_allows


class AclTopicPlugin(BaseTopicPlugin):
    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        user = session.username if session else None
        if not user or not topic:
            return False  # anonymous sessions never get anywhere on an authenticated bus
        if action == Action.PUBLISH:
            return acl_allows(user, "publish", topic)
        # A delivered topic is a one-topic filter: receiving it needs the same
        # grant as subscribing to it.  acl_allows is cached, so this per-message
        # check is a dict lookup.
        if action in (Action.SUBSCRIBE, Action.RECEIVE):
            return acl_allows(user, "subscribe", topic)
        return False


class WillAclAuthPlugin(BaseAuthPlugin):
    async def authenticate(self, *, session: Session) -> bool | None:
        if not session.will_flag:
            return None  # no opinion; the password plugin decides
        # Without this, any authenticated client could publish anywhere by
        # setting a Will and dropping the TCP connection.
        return acl_allows(session.username or "", "publish", session.will_topic or "")
