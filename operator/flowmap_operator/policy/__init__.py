"""NetworkLearningPolicy, all of it in one place.

* ``rules``: one policy read from its object, its rules and what it learned (pure);
* ``modes``: which mode each workload group is in, and what that makes of a connection (pure);
* ``compiling``: what each node's agent enforces, its NodePolicy (pure);
* ``publishing``: the policies' statuses and Events written, and the NodePolicies streamed.

What a policy's status says is built by flowmap_operator.status, with every other status.
"""
