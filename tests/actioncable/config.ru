# A real Rails ActionCable server with a RoomChannel written the way Chatwoot's is
# (app/channels/room_channel.rb, Chatwoot 4.x): the user's token stream, the account stream for
# agents, the contact's token stream, and silence (no confirm, no reject, no events) for a token
# that is unknown, an agent whose user_id does not match, or an account the user is not in,
# because Chatwoot's lookups raise inside `subscribed`. The bridge's tests run it with Debian's
# ruby-actioncable and puma (tests/actioncable.rs), so that what the mock Chatwoot does is checked
# against the real protocol implementation.
#
# Besides /cable, loopback test controls (JSON in, JSON out):
#   GET  /test/ready                      200 once the app runs
#   POST /test/broadcast {stream, event, data}   ActionCable.server.broadcast(stream, {event:, data:})
#   POST /test/rotate {user_id, pubsub_token}    the user's pubsub token changes (Chatwoot does this
#                                                when the user changes password)
#   GET  /api/v1/profile (header api_access_token)  the user's id, pubsub_token and accounts
#   POST /test/conversation {account_id}         a conversation with the account's contact, as a
#                                                widget visitor opens it; answers its display id
#   POST /test/message {account_id, conversation_id, content}
#                                                the contact writes: stored, the conversation's
#                                                activity moves, message.created broadcast as
#                                                Chatwoot's ActionCableListener does; answers its id
#   POST /test/cable_down {seconds}              every socket is closed as ActionCable.server.restart
#                                                closes it, and /cable answers 503 for that long, as
#                                                a Chatwoot being deployed behind its proxy
#   POST /test/stall {stalled: true|false}       Chatwoot's Sidekiq workers stop (or start again):
#                                                while stopped, /test/conversation and /test/message
#                                                store and move the conversation's activity (the REST
#                                                API shows it) and broadcast nothing; sockets, pings,
#                                                subscriptions and presence go on, as they come from
#                                                the web process. The broadcasts not made are dropped,
#                                                not queued for later
# and the REST API a backfill reads (header api_access_token, 401 for an account the user is not
# in), answered as Chatwoot 4.x answers it (shared/chatwoot/PROTOCOL.md):
#   GET /api/v1/accounts/{id}/conversations?status=all&updated_within=N   not paged
#   GET /api/v1/accounts/{id}/conversations/{display_id}/messages?after=ID|before=ID
# The people are in PEOPLE below; tests address streams by token and by "account_<id>".

require "json"
require "logger"
require "time"
require "action_cable"

PEOPLE = {
  users: [
    { id: 1, pubsub_token: "agent-token-1", api_access_token: "api-1", accounts: [1] },
    { id: 2, pubsub_token: "agent-token-2", api_access_token: "api-2", accounts: [1, 2] }
  ],
  contacts: [
    { id: 1, name: "Visitor", pubsub_token: "contact-token-1", source_id: "visitor-1", account: 1 }
  ]
}.freeze

# What Chatwoot keeps in Postgres, in memory: users' tokens change on rotation.
class Store
  # ROTATED="1=new-token,2=..." starts with those users' tokens rotated already: a Chatwoot that
  # restarted after a password change.
  def initialize(rotated = ENV.fetch("ROTATED", ""))
    @lock = Mutex.new
    @users = PEOPLE[:users].map(&:dup)
    rotated.split(",").each do |pair|
      user_id, token = pair.split("=", 2)
      rotate(user_id, token)
    end
  end

  # Chatwoot: User.find_by!(pubsub_token:, id:), raising when there is none.
  def user!(pubsub_token, user_id)
    @lock.synchronize do
      @users.find { |u| u[:pubsub_token] == pubsub_token && u[:id].to_s == user_id.to_s }.dup
    end || raise(KeyError, "no user with this pubsub token and id")
  end

  # Chatwoot: ContactInbox.find_by!(pubsub_token:).contact
  def contact!(pubsub_token)
    PEOPLE[:contacts].find { |c| c[:pubsub_token] == pubsub_token } ||
      raise(KeyError, "no contact with this pubsub token")
  end

  # Chatwoot: current_user.accounts.find(params[:account_id])
  def account!(user, account_id)
    user[:accounts].find { |a| a.to_s == account_id.to_s } || raise(KeyError, "not in this account")
  end

  def by_api_token(api_access_token)
    @lock.synchronize { @users.find { |u| u[:api_access_token] == api_access_token }.dup }
  end

  # The pubsub tokens of the account's agents, as they are now.
  def agent_tokens(account_id)
    @lock.synchronize { @users.select { |u| u[:accounts].include?(account_id) }.map { |u| u[:pubsub_token] } }
  end

  def rotate(user_id, pubsub_token)
    @lock.synchronize do
      user = @users.find { |u| u[:id].to_s == user_id.to_s } || raise(KeyError, "no such user")
      user[:pubsub_token] = pubsub_token
    end
  end
end

STORE = Store.new

# Conversations and their messages, as Chatwoot keeps them in Postgres: what /test/message
# creates and broadcasts is what the REST API answers, as in Chatwoot.
class Conversations
  # The website inbox every conversation here is in (the fixtures' inbox 2).
  INBOX_ID = 2
  # Chatwoot's MessageFinder: at most 100 messages after an id, 20 before one or latest.
  AFTER_LIMIT = 100
  PAGE = 20

  def initialize
    @lock = Mutex.new
    @conversations = []
    @last_message_id = 0
  end

  # Chatwoot: a widget visitor opens a conversation; display ids count per account.
  def create(account_id)
    @lock.synchronize do
      display_id = 1 + @conversations.select { |c| c[:account_id] == account_id }.map { |c| c[:id] }.max.to_i
      now = Time.now.to_f
      contact = PEOPLE[:contacts].find { |c| c[:account] == account_id }
      conversation = { id: display_id, account_id: account_id, contact: contact, status: "open",
                       created_at: now, updated_at: now, last_activity_at: now, messages: [] }
      @conversations << conversation
      snapshot(conversation)
    end
  end

  # Chatwoot: Message.create! by the contact. Its `belongs_to :conversation, touch: true` moves
  # the conversation's updated_at (what updated_within filters on) and its after_create_commit
  # sets last_activity_at (update_columns). The conversation and the message, as stored.
  def add_message(account_id, display_id, content)
    @lock.synchronize do
      conversation = find!(account_id, display_id)
      @last_message_id += 1
      now = Time.now
      message = { id: @last_message_id, content: content, message_type: 0, private: false,
                  created_at: now.to_i, updated_at: now.utc.iso8601(3) }
      conversation[:messages] << message
      conversation[:updated_at] = now.to_f
      conversation[:last_activity_at] = now.to_f
      [snapshot(conversation), message]
    end
  end

  # Chatwoot's ConversationFinder with updated_within: `updated_at > now - seconds`, not paged,
  # the latest activity first.
  # Without `seconds`, every conversation of the account.
  def updated_within(account_id, seconds)
    since = seconds && Time.now.to_f - seconds
    @lock.synchronize do
      @conversations
        .select { |c| c[:account_id] == account_id && (seconds.nil? || c[:updated_at] > since) }
        .sort_by { |c| -c[:last_activity_at] }
        .map { |c| snapshot(c) }
    end
  end

  # Chatwoot's MessageFinder: `after` the next 100 oldest first, else `before` the 20 before,
  # else the latest 20; oldest first.
  def messages(account_id, display_id, after:, before:)
    @lock.synchronize do
      conversation = find!(account_id, display_id)
      all = conversation[:messages]
      chosen =
        if after then all.select { |m| m[:id] > after }.first(AFTER_LIMIT)
        elsif before then all.select { |m| m[:id] < before }.last(PAGE)
        else all.last(PAGE)
        end
      [snapshot(conversation), chosen.map(&:dup)]
    end
  end

  private

  def find!(account_id, display_id)
    @conversations.find { |c| c[:account_id] == account_id && c[:id] == display_id } ||
      raise(KeyError, "Resource could not be found")
  end

  def snapshot(conversation)
    conversation.merge(messages: conversation[:messages].dup)
  end
end

CONVERSATIONS = Conversations.new

# What Chatwoot renders from the records: the cable's push_event_data and the REST jbuilders.
module Render
  module_function

  # Contact#push_event_data.
  def contact(contact)
    contact && { id: contact[:id], name: contact[:name], avatar: "", thumbnail: "", type: "contact",
                 email: nil, phone_number: nil, identifier: nil, additional_attributes: {},
                 custom_attributes: {} }
  end

  # Message#push_event_data: the record's attributes, created_at as an integer, the
  # conversation's display id, a little of the conversation, and the sender.
  def message_event(conversation, message)
    { id: message[:id], content: message[:content], account_id: conversation[:account_id],
      inbox_id: Conversations::INBOX_ID, conversation_id: conversation[:id],
      message_type: message[:message_type], created_at: message[:created_at],
      updated_at: message[:updated_at], private: message[:private], status: "sent",
      source_id: nil, content_type: "text", content_attributes: {}, sender_type: "Contact",
      sender_id: conversation.dig(:contact, :id), external_source_ids: {},
      additional_attributes: {}, processed_message_content: message[:content], sentiment: {},
      conversation: { assignee_id: nil, unread_count: conversation[:messages].size,
                      last_activity_at: conversation[:last_activity_at].to_i,
                      contact_inbox: { source_id: conversation.dig(:contact, :source_id) } },
      sender: contact(conversation[:contact]) }
  end

  # A message in GET .../messages (PROTOCOL.md "REST shapes a backfill reads").
  def message_rest(conversation, message)
    { id: message[:id], content: message[:content], inbox_id: Conversations::INBOX_ID,
      conversation_id: conversation[:id], message_type: message[:message_type],
      content_type: "text", status: "sent", content_attributes: {},
      created_at: message[:created_at], private: message[:private], source_id: nil,
      sender: contact(conversation[:contact]), attachments: [] }
  end

  # A conversation in GET .../conversations (_conversation.json.jbuilder, float updated_at).
  def conversation_rest(conversation)
    activity = conversation[:last_activity_at].to_i
    last = conversation[:messages].last
    { meta: { sender: contact(conversation[:contact]), channel: "Channel::WebWidget",
              hmac_verified: false },
      id: conversation[:id], account_id: conversation[:account_id],
      messages: last ? [message_event(conversation, last).except(:conversation)] : [],
      inbox_id: Conversations::INBOX_ID, status: conversation[:status],
      additional_attributes: {}, custom_attributes: {}, labels: [], muted: false,
      can_reply: true, snoozed_until: nil, unread_count: 0, priority: nil,
      agent_last_seen_at: 0, assignee_last_seen_at: 0, contact_last_seen_at: 0,
      created_at: conversation[:created_at].to_i, updated_at: conversation[:updated_at],
      timestamp: activity, last_activity_at: activity, first_reply_created_at: 0,
      waiting_since: 0, sla_policy_id: nil }
  end

  # Conversation#push_event_data, the part a conversation.created carries here.
  def conversation_event(conversation)
    conversation_rest(conversation).except(:meta, :labels, :muted)
                                   .merge(meta: { sender: contact(conversation[:contact]) })
  end
end

# Chatwoot's ActionCableListener and ActionCableBroadcastJob: an event of a conversation goes to
# the pubsub tokens of the account's agents (inbox members and administrators) and of its
# contact (not for a private note), each broadcast separately, with the account id merged in.
# The account stream carries only contact.* events, which nothing here creates.
module Listener
  module_function

  def broadcast(conversation, event, data, private_note: false)
    return if Workers.stalled?

    tokens = STORE.agent_tokens(conversation[:account_id])
    contact = conversation[:contact]
    tokens << contact[:pubsub_token] if contact && !private_note
    tokens.uniq.each do |token|
      ActionCable.server.broadcast(token, { event: event, data: data.merge(account_id: conversation[:account_id]) })
    end
  end
end

# Chatwoot's Sidekiq, which runs every ActionCableBroadcastJob: when its workers are down or
# stuck, Listener broadcasts nothing while the web process (records, REST, the cable) goes on.
module Workers
  @lock = Mutex.new
  @stalled = false

  class << self
    def stalled=(stalled)
      raise TypeError, "stalled must be true or false" unless [true, false].include?(stalled)

      @lock.synchronize { @stalled = stalled }
    end

    def stalled?
      @lock.synchronize { @stalled }
    end
  end
end

# A Chatwoot being deployed: the sockets it had are closed and its proxy answers the cable's
# upgrade 503 until it is back.
class CableGate
  @lock = Mutex.new
  @down_until = 0.0

  class << self
    # Closes every socket with the disconnect message ActionCable.server.restart sends, and
    # refuses new ones for `seconds`. (Not restart itself: it also halts the worker pool the
    # closing sockets unsubscribe through.)
    def down(seconds)
      @lock.synchronize { @down_until = now + seconds }
      ActionCable.server.connections.dup.each do |connection|
        connection.close(reason: ActionCable::INTERNAL[:disconnect_reasons][:server_restart])
      end
    end

    def down?
      @lock.synchronize { now < @down_until }
    end

    private

    def now
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end
  end

  def initialize(app)
    @app = app
  end

  def call(env)
    return [503, { "Content-Type" => "text/plain" }, ["Chatwoot is restarting"]] if CableGate.down?

    @app.call(env)
  end
end

module ApplicationCable
  # Chatwoot's connection identifies nobody: every socket is accepted.
  class Connection < ActionCable::Connection::Base
  end

  class Channel < ActionCable::Channel::Base
  end
end

class RoomChannel < ApplicationCable::Channel
  def subscribed
    current_user
    current_account
    ensure_stream
    broadcast_presence
  end

  def update_presence
    broadcast_presence
  end

  private

  def pubsub_token
    @pubsub_token ||= params[:pubsub_token]
  end

  def ensure_stream
    stream_from pubsub_token
    stream_from "account_#{current_account}" if current_account
  end

  def current_user
    @current_user ||=
      if params[:user_id].blank?
        STORE.contact!(pubsub_token).merge(kind: :contact)
      else
        STORE.user!(pubsub_token, params[:user_id]).merge(kind: :user)
      end
  end

  def current_account
    return if current_user[:kind] == :contact

    @current_account ||= STORE.account!(current_user, params[:account_id])
  end

  def broadcast_presence
    return unless current_account

    data = { account_id: current_account, users: { current_user[:id].to_s => "online" }, contacts: {} }
    ActionCable.server.broadcast(pubsub_token, { event: "presence.update", data: data })
  end
end

ActionCable.server.config.cable = { "adapter" => "async" }
ActionCable.server.config.connection_class = -> { ApplicationCable::Connection }
ActionCable.server.config.disable_request_forgery_protection = true
ActionCable.server.config.logger = Logger.new($stderr, level: Logger::WARN)
ActionCable.server.config.worker_pool_size = 4

# The test controls and the profile endpoint.
class Controls
  def call(env)
    request = Rack::Request.new(env)
    case [request.request_method, request.path_info]
    when ["GET", "/test/ready"] then json(200, ready: true)
    when ["POST", "/test/broadcast"] then broadcast(body(request))
    when ["POST", "/test/rotate"] then rotate(body(request))
    when ["GET", "/api/v1/profile"] then profile(env["HTTP_API_ACCESS_TOKEN"])
    when ["POST", "/test/conversation"] then conversation(body(request))
    when ["POST", "/test/message"] then message(body(request))
    when ["POST", "/test/cable_down"] then cable_down(body(request))
    when ["POST", "/test/stall"] then stall(body(request))
    else rest(request, env["HTTP_API_ACCESS_TOKEN"])
    end
  rescue KeyError, JSON::ParserError, ArgumentError, TypeError => e
    json(422, error: e.message)
  end

  private

  def body(request)
    JSON.parse(request.body.read(64 * 1024) || "{}")
  end

  def broadcast(message)
    ActionCable.server.broadcast(message.fetch("stream"), { event: message.fetch("event"), data: message.fetch("data") })
    json(200, broadcast: true)
  end

  def rotate(message)
    STORE.rotate(message.fetch("user_id"), message.fetch("pubsub_token"))
    json(200, rotated: true)
  end

  def profile(api_access_token)
    user = api_access_token && STORE.by_api_token(api_access_token)
    return json(401, errors: ["Invalid Access Token"]) unless user

    accounts = user[:accounts].map { |id| { id: id, name: "Account #{id}", role: "agent" } }
    json(200, id: user[:id], pubsub_token: user[:pubsub_token], accounts: accounts)
  end

  def conversation(message)
    conversation = CONVERSATIONS.create(Integer(message.fetch("account_id")))
    Listener.broadcast(conversation, "conversation.created", Render.conversation_event(conversation))
    json(200, id: conversation[:id])
  end

  def message(message)
    conversation, created = CONVERSATIONS.add_message(
      Integer(message.fetch("account_id")), Integer(message.fetch("conversation_id")),
      message.fetch("content").to_s
    )
    Listener.broadcast(conversation, "message.created", Render.message_event(conversation, created))
    json(200, id: created[:id])
  end

  def cable_down(message)
    CableGate.down(Float(message.fetch("seconds")))
    json(200, down: true)
  end

  def stall(message)
    Workers.stalled = message.fetch("stalled")
    json(200, stalled: Workers.stalled?)
  end

  # The account-scoped REST API: a valid token of a user in the account, else 401 as Chatwoot's
  # authentication and ensure_current_account answer.
  def rest(request, api_access_token)
    return json(404, error: "not found") unless request.get?

    path = request.path_info
    route = path.match(%r{\A/api/v1/accounts/(\d+)/conversations(?:/(\d+)/messages)?\z})
    return json(404, error: "not found") unless route

    user = api_access_token && STORE.by_api_token(api_access_token)
    return json(401, errors: ["Invalid Access Token"]) unless user

    account_id = route[1].to_i
    return json(401, error: "You are not authorized to access this account") unless user[:accounts].include?(account_id)

    params = request.GET
    return conversations(account_id, params) unless route[2]

    messages(account_id, route[2].to_i, params)
  end

  def conversations(account_id, params)
    within = params["updated_within"]&.to_i
    status = params["status"] || "open"
    listed = CONVERSATIONS.updated_within(account_id, within)
                          .select { |c| status == "all" || c[:status] == status }
    listed = listed.first(25) unless within # paged (page 1 only here) without updated_within
    meta = { mine_count: 0, assigned_count: 0, unassigned_count: listed.size, all_count: listed.size }
    json(200, data: { meta: meta, payload: listed.map { |c| Render.conversation_rest(c) } })
  end

  def messages(account_id, display_id, params)
    after = params["after"].presence&.to_i
    before = params["before"].presence&.to_i
    conversation, chosen = CONVERSATIONS.messages(account_id, display_id, after: after, before: before)
    meta = { labels: [], additional_attributes: {}, contact: Render.contact(conversation[:contact]) }
    json(200, meta: meta, payload: chosen.map { |m| Render.message_rest(conversation, m) })
  rescue KeyError => e
    json(404, error: e.message)
  end

  def json(status, value)
    [status, { "Content-Type" => "application/json" }, [JSON.generate(value)]]
  end
end

map("/cable") do
  use CableGate
  run ActionCable.server
end
run Controls.new
