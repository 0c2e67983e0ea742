"""Protect mode on the node: the policy the operator streams, enforced in the table ``inet flowmap``.

* ``compiling``: pure. A ``NodePolicy`` is validated into the policy in force (``PolicyInForce``)
  and compiled into the table it wants (``Ruleset``); ``verdict`` says what that policy did to an
  edge the dp saw (flowmap_agent.aggregation asks it for every delta).
* ``nftables``: the table in the node's ruleset: read it, and apply the difference in one ``nft``
  transaction.
* ``protecting``: the edge. Follows ``PolicyService.Watch`` and keeps the table to the latest
  policy; the agent's loop hears of each policy put in force.
"""
